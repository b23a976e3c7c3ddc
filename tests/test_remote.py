"""The remote worker on its own, over a local pipe: framing, the STUB, the job loop."""

from __future__ import annotations

import io
import json
import pickle
import stat
import subprocess
import sys

import cloudpickle
import pytest

from sshjobs.remote import SOURCES, STUB, WORKER, protocol
from sshjobs.worker import decode_results


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
        sources = {f"cloudpickle/{p}": open(f"{cloudpickle.__path__[0]}/{p}").read()
                   for p in ("__init__.py", "cloudpickle.py", "cloudpickle_fast.py")}
        proc.stdin.write(protocol.pack(protocol.MODULES, 0, pickle.dumps(sources)))
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
        sources = {f"cloudpickle/{p}": open(f"{cloudpickle.__path__[0]}/{p}").read()
                   for p in ("__init__.py", "cloudpickle.py", "cloudpickle_fast.py")}
        send(proc, protocol.MODULES, 0, pickle.dumps(sources))
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
