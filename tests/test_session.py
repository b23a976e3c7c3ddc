"""`sshjobs up`: a session process keeps the lab's connections and workers warm for the
commands and scripts that follow, on real sshd, as whole processes."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sshjobs import Inventory

from .conftest import quiet, user_processes, wait_no_processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def runtime(monkeypatch):
    """A runtime folder of this test's own (outside pytest's private tmp, so that another
    user could reach it but for its mode): its sessions are nobody else's."""
    folder = tempfile.mkdtemp(prefix="sshjobs-run-")
    monkeypatch.setenv("XDG_RUNTIME_DIR", folder)
    yield {k: v for k, v in os.environ.items() if k != "SSHJOBS_INVENTORY"}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def invfile(lab, runtime):
    """A copy of the lab's inventory beside it (its keys are relative to it), and the session
    of it stopped after the test, if one is still up."""
    path = Path(lab.inventory_path).parent / f"session-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(Path(lab.inventory_path).read_text())
    quiet([h.user for h in lab.hosts])
    yield path
    sshjobs("down", "-i", path, env=runtime)
    path.unlink()


@pytest.fixture
def jobs(tmp_path) -> Path:
    path = tmp_path / "jobs.py"
    path.write_text(textwrap.dedent('''
        import os, time

        def tiny():
            return 2

        def double(x):
            return 2 * x

        def where(*_):
            return os.getpid()

        def marked(folder, seconds):
            me = os.environ.get("USER") or str(os.getuid())
            open(os.path.join(folder, me + ".start"), "w").close()
            time.sleep(seconds)
            open(os.path.join(folder, me + ".end"), "w").close()
            return seconds
    '''))
    return path


def sshjobs(*args, env=None, timeout=180, input=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sshjobs", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT, input=input)


def status(path, env) -> dict | None:
    p = sshjobs("status", "-i", path, "--json", env=env)
    return json.loads(p.stdout) if p.returncode == 0 else None


def up(path, env, *extra) -> dict:
    p = sshjobs("up", "-i", path, *extra, env=env)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "10 of 10 hosts up" in p.stdout
    s = status(path, env)
    assert s is not None
    return s


def gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_up_status_down_and_commands_through_the_session(lab, invfile, runtime, jobs):
    users = [h.user for h in lab.hosts]
    s = up(invfile, runtime, "--idle", "10m")
    assert s["inventory"] == str(invfile.resolve()) and s["calls"] == 0 and s["idle_limit"] == 600
    assert all(h["up"] and h["workers"] >= 1 for h in s["hosts"]) and len(s["hosts"]) == 10
    again = sshjobs("up", "-i", invfile, env=runtime)
    assert again.returncode == 0 and "already up" in again.stdout and str(s["pid"]) in again.stdout

    # the same workers answer every command: their pids do not change from one run to the next
    first = sshjobs("run", "-i", invfile, f"{jobs}:where", "--json", env=runtime)
    second = sshjobs("run", "-i", invfile, f"{jobs}:where", "--json", env=runtime)
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    pids = [[r["value"] for r in map(json.loads, p.stdout.splitlines())] for p in (first, second)]
    assert len(pids[0]) == 10 and pids[0] == pids[1]
    assert status(invfile, runtime)["calls"] == 2

    mapped = sshjobs("map", "-i", invfile, f"{jobs}:double", "--args", "-", "--json", env=runtime,
                     input="".join(f"{i}\n" for i in range(30)))
    assert mapped.returncode == 0, mapped.stderr
    assert [json.loads(x)["value"] for x in mapped.stdout.splitlines()] == [2 * i for i in range(30)]
    ran = sshjobs("map", "-i", invfile, f"{jobs}:where", "--range", "40", "--json", env=runtime)
    assert ran.returncode == 0, ran.stderr
    assert len(ran.stdout.splitlines()) == 40
    ex = sshjobs("exec", "-i", invfile, "--json", "--", "echo", "hi", env=runtime)
    assert ex.returncode == 0 and [json.loads(x)["stdout"] for x in ex.stdout.splitlines()] == ["hi\n"] * 10
    # a command run by the warm workers reads as one run over its own SSH channel
    line = 'cd; pwd; echo "$0" >&2; exit 3'
    rows = {how: [{k: json.loads(x)[k] for k in ("host", "ok", "exit_status", "stdout", "stderr", "error")}
                  for x in sshjobs("exec", "-i", invfile, "--json", *flag, "--", line, env=runtime).stdout.splitlines()]
            for how, flag in (("session", ()), ("direct", ("--no-session",)))}
    assert rows["session"] == rows["direct"] and rows["session"][0]["exit_status"] == 3
    late = sshjobs("exec", "-i", invfile, "--json", "--timeout", "0.5", "--", "echo a; sleep 30", env=runtime)
    assert [json.loads(x)["error"] for x in late.stdout.splitlines()] == [
        "Timeout: the command did not finish within 0.5s"] * 10
    time.sleep(0.5)
    assert not [p for u in users for p in user_processes(u) if "sleep 30" in p]  # killed, all it started too
    ping = sshjobs("ping", "-i", invfile, "--json", env=runtime)
    assert ping.returncode == 0 and all(json.loads(x)["ok"] for x in ping.stdout.splitlines())
    lim = sshjobs("run", "-i", invfile, "--limit", "node0[1-3]", f"{jobs}:tiny", "--json", env=runtime)
    assert [json.loads(x)["host"] for x in lim.stdout.splitlines()] == ["node01", "node02", "node03"]
    s = status(invfile, runtime)
    assert s["calls"] == 9 and s["jobs"] >= 2 * 10 + 30 + 40 + 10 + 10 + 3

    # --no-session: a run of its own, other workers, and the session hears nothing of it
    direct = sshjobs("run", "-i", invfile, f"{jobs}:where", "--json", "--no-session", env=runtime)
    assert direct.returncode == 0
    assert not set(r["value"] for r in map(json.loads, direct.stdout.splitlines())) & set(pids[0])
    assert status(invfile, runtime)["calls"] == 9

    down = sshjobs("down", "-i", invfile, env=runtime)
    assert down.returncode == 0 and f"pid {s['pid']}" in down.stdout
    assert gone(s["pid"])
    assert wait_no_processes(users, timeout=10) == {}  # every worker ended, every connection closed
    assert status(invfile, runtime) is None
    assert "no session is up" in sshjobs("down", "-i", invfile, env=runtime).stdout


def test_the_api_uses_the_session_without_importing_ssh(lab, invfile, runtime, jobs):
    up(invfile, runtime)
    script = textwrap.dedent(f'''
        import json, os, sys
        from sshjobs import Inventory
        inv = Inventory.load({str(invfile)!r})
        base = 10
        results = inv.gather(lambda: base + 1)             # a closure, pickled here
        mapped = inv.map(lambda x: x * base, range(25))
        streamed = [r.value for r in inv.imap(lambda x: -x, iter(range(5)))]
        off = Inventory.load({str(invfile)!r}, session=False)
        print(json.dumps({{"values": [r.value for r in results], "mapped": [r.value for r in mapped],
                           "streamed": streamed, "asyncssh": "asyncssh" in sys.modules}}))
    ''')
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=runtime, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["values"] == [11] * 10 and out["mapped"] == [x * 10 for x in range(25)]
    assert out["streamed"] == [0, -1, -2, -3, -4]
    assert out["asyncssh"] is False
    assert status(invfile, runtime)["calls"] == 3

    inv = Inventory.load(invfile, session=False)
    assert [r.value for r in inv.gather(lambda: 3)] == [3] * 10
    assert status(invfile, runtime)["calls"] == 3  # session=False went its own way
    inv = Inventory.load(invfile)
    failed = inv.gather(lambda: 1 / 0, timeout=30)
    assert [r.error.type for r in failed] == ["ZeroDivisionError"] * 10  # the same Results as a direct run
    slow = inv.gather(lambda: __import__("time").sleep(5), timeout=0.3)
    assert [r.error.type for r in slow] == ["Timeout"] * 10
    assert status(invfile, runtime)["calls"] == 5
    import threading

    lock = threading.Lock()
    unpicklable = inv.gather(lambda: lock)  # reported as Results, as a direct run does
    assert [r.error.type for r in unpicklable] == ["PicklingError"] * 10


def test_a_killed_session_leaves_nothing_on_the_hosts_and_commands_run_directly(lab, invfile, runtime, jobs):
    users = [h.user for h in lab.hosts]
    s = up(invfile, runtime)
    os.kill(s["pid"], signal.SIGKILL)
    assert gone(s["pid"])
    # the workers' stdin closed with their connections: they are gone
    assert wait_no_processes(users, timeout=15) == {}
    p = sshjobs("run", "-i", invfile, f"{jobs}:tiny", env=runtime)
    assert p.returncode == 0, p.stderr
    assert "10 of 10 jobs ok" in p.stdout
    assert status(invfile, runtime) is None
    # a new session takes the place of the dead one's socket
    up(invfile, runtime)


def test_ctrl_c_through_the_session_ends_the_remote_jobs(lab, invfile, runtime, jobs, shared):
    up(invfile, runtime)
    proc = subprocess.Popen([sys.executable, "-m", "sshjobs", "run", "-i", invfile, f"{jobs}:marked", shared, "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=runtime, cwd=ROOT)
    deadline = time.monotonic() + 30
    while len(list(shared.glob("*.start"))) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(shared.glob("*.start"))) == 10
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err
    time.sleep(5)
    assert list(shared.glob("*.end")) == []  # killed on the hosts, not left to finish
    s = status(invfile, runtime)
    assert s is not None and s["running"] == 0
    # and the session is warm again for the next command
    p = sshjobs("run", "-i", invfile, f"{jobs}:tiny", env=runtime)
    assert p.returncode == 0 and "10 of 10 jobs ok" in p.stdout


def test_idle_expiry_ends_the_session_and_its_workers(lab, invfile, runtime):
    users = [h.user for h in lab.hosts]
    s = up(invfile, runtime, "--idle", "2s")
    assert s["idle_limit"] == 2
    assert gone(s["pid"], timeout=20)
    assert wait_no_processes(users, timeout=10) == {}
    assert status(invfile, runtime) is None


def test_a_changed_inventory_starts_the_session_over(lab, invfile, runtime, jobs):
    s = up(invfile, runtime)
    invfile.write_text(invfile.read_text() + "\n# changed\n")
    p = sshjobs("run", "-i", invfile, f"{jobs}:tiny", env=runtime)
    assert p.returncode == 0 and "10 of 10 jobs ok" in p.stdout
    after = status(invfile, runtime)
    assert after["pid"] == s["pid"] and after["content"] != s["content"] and after["calls"] == 1
    # a script holding a content that is neither the session's nor the file's now runs directly
    invfile.write_text(invfile.read_text() + "# changed again\n")
    held = Inventory.load(invfile)
    invfile.write_text(invfile.read_text() + "# and again\n")
    assert [r.value for r in held.gather(lambda: 5)] == [5] * 10
    assert status(invfile, runtime)["calls"] == 1


def test_another_user_cannot_reach_the_session(lab, invfile, runtime, root):
    s = up(invfile, runtime)
    folder = Path(runtime["XDG_RUNTIME_DIR"]) / "sshjobs"
    assert folder.stat().st_mode & 0o777 == 0o700
    sock = next(folder.glob("*.sock"))
    assert sock.stat().st_mode & 0o777 == 0o600
    other = pwd.getpwnam(lab.hosts[0].user)
    probe = textwrap.dedent(f'''
        import socket, struct, pickle, sys
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect({str(sock)!r})
        except OSError as exc:
            print("refused:", exc.errno); sys.exit(0)
        data = pickle.dumps({{"op": "status"}})
        try:
            s.sendall(struct.pack("!Q", len(data)) + data)
            print("answered" if s.recv(100) else "closed")
        except ConnectionError:
            print("closed")
    ''')

    def as_other() -> str:
        p = subprocess.run(["setpriv", f"--reuid={other.pw_uid}", f"--regid={other.pw_gid}", "--clear-groups",
                               sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
        return p.stdout.strip() or p.stderr

    os.chmod(Path(runtime["XDG_RUNTIME_DIR"]), 0o755)
    assert as_other().startswith("refused")  # the 0700 folder keeps it out
    # and with the folder and socket opened up, the session itself checks its peer's uid
    folder.chmod(0o755)
    sock.chmod(0o666)
    try:
        assert as_other().strip() == "closed"
    finally:
        folder.chmod(0o700)
        sock.chmod(0o600)
    assert status(invfile, runtime)["pid"] == s["pid"]


@pytest.mark.parametrize("source", ["range", "generator"])
def test_leaving_an_imap_early_ends_its_remote_jobs(lab, invfile, runtime, shared, source):
    up(invfile, runtime)
    script = textwrap.dedent(f'''
        import os, time
        from sshjobs import Inventory

        def job(i):
            import os, time
            open(os.path.join({str(shared)!r}, f"{{i}}.start"), "w").close()
            time.sleep(0.1 if i == 0 else 4)
            open(os.path.join({str(shared)!r}, f"{{i}}.end"), "w").close()
            return i

        items = range(20) if {source!r} == "range" else (i for i in range(20))
        for r in Inventory.load({str(invfile)!r}).imap(job, items):
            assert r.value == 0
            break
    ''')
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=runtime, timeout=60)
    assert p.returncode == 0, p.stderr
    time.sleep(5)
    assert {f.name for f in shared.glob("*.end")} == {"0.end"}  # the rest were killed, not left to finish
    assert status(invfile, runtime)["running"] == 0
