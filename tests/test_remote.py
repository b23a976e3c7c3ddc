"""The remote worker on its own, over a local pipe: framing, the STUB, the job loop."""

from __future__ import annotations

import ast
import io
import json
import pickle
import stat
import subprocess
import sys

import cloudpickle
import pytest

from sshjobs.remote import PROVISION, SOURCES, STUB, WORKER, protocol
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
    hello = json.loads(body)
    if hello["cloudpickle"] != cloudpickle.__version__:
        proc.stdin.write(protocol.pack(protocol.MODULES, 0, pickle.dumps(_cloudpickle_sources())))
    proc.hello = hello
    yield proc
    proc.kill()
    proc.wait()


def send(proc, *frame):
    proc.stdin.write(protocol.pack(*frame))
    proc.stdin.flush()


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
    kind, job, body = protocol.read_frame(worker.stdout)
    assert (kind, job) == (protocol.RESULT, 5)
    [(ok, value, out, err, took)] = decode_results(body)
    assert ok and value == 11 and out == "item 1\n" and took >= 0
    kind, job, body = protocol.read_frame(worker.stdout)
    assert (kind, job) == (protocol.RESULT, 6)
    results = decode_results(body)
    assert [r[1] for r in results[:2]] == [11, 12]
    assert results[2][0] is False and results[2][1][0] == "TypeError"
    # cloudpickle's source was cached in the workdir for the next worker
    assert (tmp_path / "wd" / "lib" / f"cloudpickle-{cloudpickle.__version__}" / "cloudpickle").is_dir()


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
    kind, _, body = protocol.read_frame(worker.stdout)
    [(ok, value, out, err, took)] = decode_results(body)
    assert ok, value
    assert value == (True, 2, 6, 32, "functools")
    send(worker, protocol.FUNC, 2, cloudpickle.dumps(lambda: __import__("functools").partial(max, 3)))
    send(worker, protocol.CALL, 2, protocol.FID.pack(2) + pickle.dumps(((), {})))
    kind, _, body = protocol.read_frame(worker.stdout)
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
        kind, got, body = protocol.read_frame(worker.stdout)
        assert (kind, got) == (protocol.RESULT, job)
        assert decode_results(body)[0][:2] == (True, "")


def test_hello_json_without_the_json_module():
    """HELLO and FATAL are written by protocol._json (json's import costs every worker start):
    the controller's json.loads must get back exactly what the worker had."""
    odd = 'q"uote \\ back\nnew\ttab \x00 \x7f é € 😀 \udcff'
    for value in ({"home": odd, "python": [3, 11, 2], "cpus": 2, "none": None, "flags": [True, False]},
                  [odd, "Traceback (most recent call last):\n  ...", -1], {}, [], ""):
        assert json.loads(protocol._json(value)) == value


def start_keyed(tmp_path):
    """A worker started the way the controller starts one: with a cache key and the
    workdir on the first line, and a pickled CONFIG."""
    wd = str(tmp_path / "wd")
    proc = subprocess.Popen(["/usr/bin/python3", "-c", STUB], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    config = {"cloudpickle": cloudpickle.__version__, "workdir": wd}
    proc.stdin.write(WORKER.start(wd)
                     + protocol.pack(protocol.CONFIG, 0, pickle.dumps(config, protocol=4)))
    proc.stdin.flush()
    kind, _, body = protocol.read_frame(proc.stdout)
    assert kind == protocol.HELLO, body
    hello = json.loads(body)
    if hello["cloudpickle"] != cloudpickle.__version__:
        send(proc, protocol.MODULES, 0, pickle.dumps(_cloudpickle_sources()))
    # it serves jobs
    send(proc, protocol.FUNC, 1, cloudpickle.dumps(lambda x: x * 3))
    send(proc, protocol.CALL, 2, protocol.FID.pack(1) + pickle.dumps(((5,), {})))
    kind, job, body = protocol.read_frame(proc.stdout)
    assert (kind, job) == (protocol.RESULT, 2) and decode_results(body)[0][:2] == (True, 15)
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0, proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return hello, tmp_path / "wd" / "code"


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
         "compile(s,n,'exec') for n,s in pickle.load(sys.stdin.buffer))))"],
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


def test_an_unwritable_code_cache_still_starts(tmp_path):
    (tmp_path / "wd").mkdir(mode=0o700)
    (tmp_path / "wd" / "code").write_text("a file where the cache directory would go")
    for _ in range(2):
        assert start_keyed(tmp_path)[0]["platform"] == sys.platform


def test_frame_kinds_keep_their_wire_values_and_names():
    assert protocol.KINDS == {1: "CONFIG", 2: "MODULES", 3: "FUNC", 4: "CALL", 5: "MAP", 6: "SHUTDOWN", 10: "HELLO",
                              11: "RESULT", 12: "OUTPUT", 13: "FATAL", 14: "BYTES", 15: "BYTEARRAY"}
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

    for start in ("compiled", "from the code cache"):
        proc = subprocess.Popen(BARE_PYTHON3, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        config = {"cloudpickle": cloudpickle.__version__, "workdir": wd}
        proc.stdin.write(WORKER.start(wd) + protocol.pack(protocol.CONFIG, 0, pickle.dumps(config, protocol=4)))
        proc.stdin.flush()
        kind, _, body = protocol.read_frame(proc.stdout)
        assert kind == protocol.HELLO, (start, body)
        hello = json.loads(body)
        if start == "compiled":
            assert hello["cloudpickle"] is None  # not even the system's: no site-packages
            send(proc, protocol.MODULES, 0, pickle.dumps(_cloudpickle_sources()))
        else:
            assert hello["cloudpickle"] == cloudpickle.__version__  # cached in the workdir
            assert [p.name.split("-")[0] for p in (tmp_path / "wd" / "code").iterdir()] == [WORKER.key]
        send(proc, protocol.FUNC, 1, cloudpickle.dumps(job))
        send(proc, protocol.CALL, 2, protocol.FID.pack(1) + pickle.dumps(((21,), {})))
        kind, job_id, body = protocol.read_frame(proc.stdout)
        assert (kind, job_id) == (protocol.RESULT, 2)
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
    for _ in range(2):  # compiled, then from the code cache
        out = subprocess.run(BARE_PYTHON3, cwd=cwd, input=PROVISION.start(str(wd)) + request,
                             capture_output=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"ok": True, "workdir": str(wd), "envs": []}
        [cached] = (wd / "code").iterdir()
        assert cached.name.startswith(PROVISION.key) and stat.S_IMODE(cached.stat().st_mode) == 0o600
