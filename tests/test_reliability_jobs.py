"""What a job meets on the host, against the real lab: the output of its subprocesses and C
code, a worker left as the job found it, errors caught by their own type, async jobs, and
what a host with another version of a package says."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest

from sshjobs import Inventory, RemoteError


def one(inv):
    """node01 with one slot: every call runs on the same worker."""
    return Inventory([replace(inv.hosts[0], slots=1)])


# -- 5: output of subprocesses and C code ---------------------------------------------------
def test_subprocess_and_fd_output_is_the_jobs_in_order(inv):
    def job():
        import os
        import subprocess
        import sys

        print("before")
        sys.stdout.flush()
        subprocess.run(["echo", "from echo"], check=True)
        os.write(1, b"raw fd 1\n")
        os.write(2, b"raw fd 2\n")
        subprocess.run(["sh", "-c", "echo to-stderr >&2"], check=True)
        print("after")
        return 1

    (r,) = inv.select("node01").gather(job)
    assert r.ok, r.error
    assert r.stdout == "before\nfrom echo\nraw fd 1\nafter\n"
    assert r.stderr == "raw fd 2\nto-stderr\n"


def test_a_chatty_subprocess_neither_blocks_nor_loses_output(inv):
    def job(n):
        import subprocess

        subprocess.run(["seq", str(n)], check=True)  # ~6 MB: far more than a pipe holds
        return n

    (r,) = inv.select("node01").gather(job, 1_000_000, timeout=60)
    assert r.ok, r.error
    lines = r.stdout.splitlines()
    assert len(lines) == 1_000_000 and lines[0] == "1" and lines[-1] == "1000000"


def test_output_of_a_thread_after_its_job_returned_is_no_later_jobs(inv, faults):
    async def main():
        async with one(inv).connect() as c:
            def leave_a_thread():
                import os
                import threading
                import time

                def chatter():
                    for _ in range(40):
                        print("late python")
                        os.write(1, b"late fd\n")
                        time.sleep(0.01)

                threading.Thread(target=chatter, daemon=True).start()
                return "started"

            first = await c.submit(leave_a_thread)
            later = [await c.submit(lambda: __import__("time").sleep(0.05) or "quiet") for _ in range(3)]
            return first, later

    with faults.inject("a job leaves a thread printing behind it"):
        first, later = asyncio.run(main())
        assert first.ok and first.value == "started"
        for r in later:
            assert r.ok and r.value == "quiet"
            assert "late python" not in r.stdout, r.stdout  # a thread older than the job: not its output


def test_v_shows_a_subprocess_output_in_the_cli(lab, tmp_path):
    path = lab.write_inventory(tmp_path / "inv.toml")
    jobs = tmp_path / "jobs.py"
    jobs.write_text(textwrap.dedent("""
        import subprocess

        def build():
            subprocess.run(["echo", "compiling foo.c"], check=True)
            return "built"
    """))
    p = subprocess.run([sys.executable, "-m", "sshjobs", "run", "-i", path, "-l", "node01", f"{jobs}:build", "-v"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "compiling foo.c" in p.stdout and "built" in p.stdout


# -- 11: a worker left as the job found it --------------------------------------------------
def test_cwd_and_environ_are_restored_after_each_job_but_imports_persist(inv, faults):
    async def main():
        async with one(inv).connect() as c:
            def meddle():
                import os
                import sys
                import tempfile

                os.chdir(tempfile.gettempdir())
                os.environ["SSHJOBS_TEST_LEAK"] = "1"
                home = os.environ.pop("HOME")
                sys.path.append("/nonexistent-sshjobs-test")
                import json  # noqa: F401  (an import persists, as documented)
                return home

            def look():
                import os
                import sys

                return (os.getcwd(), os.environ.get("SSHJOBS_TEST_LEAK"), os.environ.get("HOME"),
                        os.path.expanduser("~"), "/nonexistent-sshjobs-test" in sys.path, "json" in sys.modules)

            before = await c.submit(look)
            home = await c.submit(meddle)
            after = await c.submit(look)
            mapped = await c.map(lambda _: __import__("os").chdir("/") or __import__("os").getcwd(), range(3))
            last = await c.submit(look)
            return before, home, after, mapped, last

    with faults.inject("a job changes its worker's folder and environment"):
        before, home, after, mapped, last = asyncio.run(main())
        assert home.ok and home.value == before.value[2]
        cwd, leak, env_home, user_home, _, _ = after.value
        assert (cwd, leak, env_home, user_home) == before.value[:4]
        assert after.value[4:] == (True, True)  # sys.path and imports persist
        assert [r.value for r in mapped] == ["/"] * 3 and last.value[0] == before.value[0]


# -- 9: errors caught by their own type; async jobs -----------------------------------------
class Overdrawn(Exception):
    pass


def test_a_remote_exception_is_caught_by_its_own_type_and_keeps_its_traceback(inv):
    def fail(kind):
        if kind == "value":
            raise ValueError("bad value 42")
        if kind == "file":
            open("/nonexistent/sshjobs")
        raise Overdrawn("balance below zero")

    results = inv.select("node01").map(fail, ["value", "file", "mine"])
    caught = []
    for r, cls in zip(results, (ValueError, FileNotFoundError, Overdrawn)):
        with pytest.raises(cls) as info:
            r.unwrap()
        err = info.value
        assert isinstance(err, RemoteError) and err.host == "node01"
        assert err.type == cls.__qualname__
        assert "Traceback (most recent call last)" in err.traceback and "fail" in err.traceback
        caught.append(str(err))
    assert caught[0] == "ValueError: bad value 42"
    with pytest.raises(OSError):  # a parent class catches it too
        results[1].unwrap()


def test_an_exception_class_the_controller_lacks_is_a_plain_remote_error(inv):
    def fail():
        class Local(Exception):
            pass

        raise Local("only on the host")

    (r,) = inv.select("node01").gather(fail)
    assert type(r.error) is RemoteError and r.error.type.endswith("fail.<locals>.Local")
    assert "only on the host" in str(r.error)


def test_an_async_job_is_awaited_on_the_host(inv):
    async def fetch(x):
        await asyncio.sleep(0.01)
        return x * 2

    assert [r.value for r in inv.select("node01").map(fetch, [1, 2, 3])] == [2, 4, 6]
    (r,) = inv.select("node01").gather(fetch, 21)
    assert r.ok and r.value == 42


# -- 12: a package of another version on the host -------------------------------------------
@pytest.fixture
def thing(tmp_path, monkeypatch):
    """A class of the controller's package vpkg 2.0, in its submodule vpkg._core."""
    pkg = tmp_path / "controller" / "vpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '2.0'\n")
    (pkg / "_core.py").write_text("class Thing:\n    def __init__(self, x):\n        self.x = x\n")
    monkeypatch.syspath_prepend(str(tmp_path / "controller"))
    from vpkg._core import Thing  # pickled by reference: the host must import vpkg._core

    yield Thing
    for name in ("vpkg._core", "vpkg"):
        sys.modules.pop(name, None)


def test_an_argument_of_a_newer_package_than_the_hosts_says_so(inv, thing):
    async def main():
        async with one(inv).connect() as c:
            def old_package():  # the host's vpkg 1.0, which has no _core, on this worker's path
                import os
                import sys
                import tempfile

                root = tempfile.mkdtemp()
                os.mkdir(os.path.join(root, "vpkg"))
                with open(os.path.join(root, "vpkg", "__init__.py"), "w") as f:
                    f.write("__version__ = '1.0'\n")
                sys.path.insert(0, root)
                return root

            root = await c.submit(old_package)
            got = await c.submit(lambda t: t.x, thing(1))
            await c.submit(lambda d: __import__("shutil").rmtree(d), root.value)
            return got

    got = asyncio.run(main())
    assert not got.ok and isinstance(got.error, ModuleNotFoundError)
    message = str(got.error)
    assert "vpkg 2.0" in message and "vpkg 1.0" in message and "requirements=['vpkg==2.0']" in message


def test_an_argument_of_a_package_the_host_lacks_says_what_to_install(inv, thing):
    (r,) = inv.select("node01").gather(lambda t: t.x, thing(5))
    assert not r.ok and isinstance(r.error, ImportError)
    assert "which this host cannot import" in str(r.error) and "requirements=['vpkg==2.0']" in str(r.error)
