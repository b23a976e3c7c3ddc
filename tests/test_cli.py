"""The `sshjobs` command line, run as a real subprocess against the 10-host lab."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
import uuid
from pathlib import Path

import pytest

from sshjobs.lab import Lab

from .conftest import LAB_SUBNET, wait_no_processes

ROOT = Path(__file__).resolve().parent.parent

JOBS = '''
import os, pwd, time

def who(x, y=0):
    print("hello from", pwd.getpwuid(os.getuid()).pw_name)
    return {"user": pwd.getpwuid(os.getuid()).pw_name, "sum": x + y}

def square(x):
    if x == 7:
        raise ValueError(f"seven is bad: {x}")
    return x * x

def echo(item):
    return item

def slow_echo(item):
    time.sleep(0.01)  # 2 s for one host over 200 items: the others take part as they come up
    return item

def nap(seconds):
    time.sleep(seconds)
    return seconds

def opaque(_=None):
    return object()

def barrier(folder, n=10, limit=60.0):
    """Wait (up to limit s) until n jobs on distinct hosts have reached this point."""
    me = pwd.getpwuid(os.getuid()).pw_name
    open(os.path.join(folder, me), "w").close()
    deadline = time.monotonic() + limit
    while len(os.listdir(folder)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(os.listdir(folder))
'''


def sshjobs(*args, env=None, timeout=180, cwd=None, input=None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "SSHJOBS_INVENTORY"}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "sshjobs", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or ROOT, input=input)
    return proc


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "jobs.py"
    path.write_text(JOBS)
    return path


@pytest.fixture(autouse=True)
def own_state(tmp_path, monkeypatch):
    """Each test's own record of `sshjobs install` (so one test's install is not another's)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture
def invfile(lab) -> str:
    return str(lab.inventory_path)


# -- run / map -----------------------------------------------------------------------------
def test_run_calls_the_function_once_per_host_with_json_arguments(lab, invfile, jobs):
    p = sshjobs("run", "-i", invfile, f"{jobs}:who", "40", "--json")
    assert p.returncode == 0, p.stderr
    rows = json_lines(p.stdout)
    assert [r["host"] for r in rows] == [h.name for h in lab.hosts]
    assert [r["value"] for r in rows] == [{"user": h.user, "sum": 40} for h in lab.hosts]
    assert all(r["ok"] and r["error"] is None and r["duration"] >= 0 for r in rows)
    assert rows[0]["stdout"] == f"hello from {lab.hosts[0].user}\n"


def test_run_by_module_path_with_a_string_argument(lab, invfile, jobs):
    p = sshjobs("run", "-i", invfile, "--limit", "node01", "jobs:echo", '"7"', "--json", cwd=jobs.parent)
    assert p.returncode == 0, p.stderr
    (row,) = json_lines(p.stdout)
    assert row["value"] == "7" and row["host"] == "node01"


def test_map_range_returns_every_item_in_input_order(invfile, jobs):
    p = sshjobs("map", "-i", invfile, f"{jobs}:slow_echo", "--range", "200", "--json")
    assert p.returncode == 0, p.stderr
    rows = json_lines(p.stdout)
    assert [r["job"] for r in rows] == list(range(200))
    assert [r["value"] for r in rows] == list(range(200))
    assert len({r["host"] for r in rows}) > 1


def test_map_spreads_a_few_slow_jobs_over_every_host(invfile, jobs, tmp_path, root):
    # Each job waits until 10 hosts have one running: only one job per host lets them all
    # finish (a host taking two would keep the others waiting until the 60 s limit).
    # Hosts are told apart by their users: the root lab's.
    folder = tempfile.mkdtemp(prefix="sshjobs-barrier-", dir="/tmp")
    os.chmod(folder, 0o1777)  # each lab host is its own user
    try:
        items = tmp_path / "folders.jsonl"
        items.write_text((json.dumps(folder) + "\n") * 10)
        p = sshjobs("map", "-i", invfile, f"{jobs}:barrier", "--args", items, "--json")
        assert p.returncode == 0, p.stderr
        rows = json_lines(p.stdout)
        assert [r["value"] for r in rows] == [10] * 10
        assert len({r["host"] for r in rows}) == 10  # one job per host, not four on the first
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_map_args_file_one_json_value_per_line(invfile, jobs, tmp_path):
    items = [1, "two", [3, 4], {"five": 5}, None, 2.5]
    args = tmp_path / "items.jsonl"
    args.write_text("".join(json.dumps(x) + "\n" for x in items) + "\n")
    p = sshjobs("map", "-i", invfile, f"{jobs}:echo", "--args", args, "--json")
    assert p.returncode == 0, p.stderr
    assert [r["value"] for r in json_lines(p.stdout)] == items


def test_a_failed_job_exits_1_with_its_exception_and_v_shows_the_traceback(invfile, jobs):
    p = sshjobs("map", "-i", invfile, f"{jobs}:square", "--range", "10")
    assert p.returncode == 1
    assert "\x1b" not in p.stdout  # not a terminal: plain lines
    lines = p.stdout.splitlines()
    assert len([ln for ln in lines if ln.startswith("job-")]) == 10
    (bad,) = [ln for ln in lines if "FAILED" in ln]
    assert bad.startswith("job-7 ") and "ValueError: seven is bad: 7" in bad
    assert "Traceback" not in p.stdout
    assert re.search(r"^job-3 +node\d+ +ok .* 9$", p.stdout, re.M)
    (count,) = [ln for ln in lines if " jobs ok" in ln]  # the count line, then hosts not waited for
    assert "9 of 10 jobs ok, 1 failed" in count

    v = sshjobs("map", "-i", invfile, f"{jobs}:square", "--range", "10", "-v")
    assert v.returncode == 1
    assert "Traceback (most recent call last)" in v.stdout
    assert 'raise ValueError(f"seven is bad: {x}")' in v.stdout


def test_verbose_prints_the_jobs_captured_stdout(invfile, jobs):
    p = sshjobs("run", "-i", invfile, "--limit", "node02", f"{jobs}:who", "1", "-v")
    assert p.returncode == 0
    assert "--- job-0 on node02: stdout" in p.stdout
    assert "hello from" in p.stdout


def test_json_output_is_only_json_and_logs_go_to_stderr(invfile, jobs):
    p = sshjobs("map", "-i", invfile, f"{jobs}:square", "--range", "10", "--json", "-v", "--log-format", "json")
    assert p.returncode == 1
    rows = json_lines(p.stdout)  # every stdout line parses: nothing else is there
    assert len(rows) == 10
    bad = rows[7]
    assert bad["ok"] is False and bad["value"] is None
    assert bad["error"]["type"] == "ValueError" and bad["error"]["message"] == "seven is bad: 7"
    assert "Traceback" in bad["error"]["traceback"]
    logs = json_lines(p.stderr)
    assert logs, "-v logs the progress events"
    done = [e for e in logs if e["event"] == "done"]
    assert done and all("host" in e and "job" in e for e in done)
    assert {e["event"] for e in logs} >= {"connecting", "connected", "running", "done"}


def test_a_value_that_is_not_json_is_given_as_its_repr(invfile, jobs):
    p = sshjobs("run", "-i", invfile, "--limit", "node01", f"{jobs}:opaque", "--json")
    (row,) = json_lines(p.stdout)
    assert row["ok"] and row["value_is_repr"] is True
    assert row["value"].startswith("<object object at 0x")


def test_timeout_fails_the_job_with_timeout(invfile, jobs):
    t0 = time.monotonic()
    p = sshjobs("run", "-i", invfile, "--limit", "node01,node02", f"{jobs}:nap", "30", "--timeout", "1", "--json")
    assert p.returncode == 1
    rows = json_lines(p.stdout)
    assert [r["error"]["type"] for r in rows] == ["Timeout", "Timeout"]
    assert time.monotonic() - t0 < 20


# -- selection, inventory errors, usage errors --------------------------------------------------
def test_limit_by_group_and_by_glob(invfile, jobs):
    even = json_lines(sshjobs("run", "-i", invfile, "--limit", "even", f"{jobs}:echo", "0", "--json").stdout)
    assert [r["host"] for r in even] == ["node02", "node04", "node06", "node08", "node10"]
    glob = json_lines(sshjobs("run", "-i", invfile, "--limit", "node0[1-3],node10", f"{jobs}:echo", "0",
                              "--json").stdout)
    assert [r["host"] for r in glob] == ["node01", "node02", "node03", "node10"]
    p = sshjobs("run", "-i", invfile, "--limit", "evn", f"{jobs}:echo", "0")
    assert p.returncode == 2
    assert "--limit 'evn' matches no host or group (did you mean 'even'?)" in p.stderr


def test_a_bad_inventory_exits_2_naming_the_file_and_the_key(tmp_path, jobs):
    bad = tmp_path / "bad.toml"
    bad.write_text('[defaults]\nuser = "x"\n\n[hosts.web1]\naddress = "10.0.0.1"\nprot = 2222\n')
    p = sshjobs("run", "-i", bad, f"{jobs}:echo", "1")
    assert p.returncode == 2
    assert f"{bad}: host 'web1': unknown key 'prot' (did you mean 'port'?)" in p.stderr
    assert p.stdout == ""
    syntax = tmp_path / "syntax.toml"
    syntax.write_text("[hosts.a\n")
    p = sshjobs("ping", "-i", syntax)
    assert p.returncode == 2 and f"{syntax}: TOML syntax error" in p.stderr


def test_the_inventory_defaults_to_the_environment_then_hosts_toml(lab, jobs, tmp_path):
    p = sshjobs("run", f"{jobs}:echo", "5", "--json", env={"SSHJOBS_INVENTORY": str(lab.inventory_path)})
    assert p.returncode == 0, p.stderr
    assert len(json_lines(p.stdout)) == 10
    lab.write_inventory(tmp_path / "hosts.toml")
    p = sshjobs("run", "--limit", "node05", f"{jobs}:echo", "5", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert [r["host"] for r in json_lines(p.stdout)] == ["node05"]
    empty = tmp_path / "empty"
    empty.mkdir()
    p = sshjobs("run", f"{jobs}:echo", "5", cwd=empty)
    assert p.returncode == 2
    assert "hosts.toml: inventory file not found (give one with -i FILE or $SSHJOBS_INVENTORY)" in p.stderr


def test_usage_errors_exit_2(invfile, jobs, tmp_path):
    cases = [
        (["run", "-i", invfile, f"{jobs}:missing"], f"{jobs}: has no 'missing'"),
        (["run", "-i", invfile, "nojobfile.py:f"], "nojobfile.py: job file not found"),
        (["run", "-i", invfile, "justaname"], "TARGET must be path/to/file.py:func"),
        (["map", "-i", invfile, f"{jobs}:echo"], "give exactly one of --range N and --args FILE"),
        (["run", "-i", invfile, "--bogus", f"{jobs}:echo"], "No such option '--bogus'"),
    ]
    for args, message in cases:
        p = sshjobs(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert message in p.stderr, (args, p.stderr)
    items = tmp_path / "items.txt"
    items.write_text("1\n{oops\n")
    p = sshjobs("map", "-i", invfile, f"{jobs}:echo", "--args", items)
    assert p.returncode == 2 and f"{items}:2: not a JSON value" in p.stderr


def test_an_unreachable_host_fails_alone_and_exits_1(lab, jobs, tmp_path):
    inv = tmp_path / "plus.toml"
    lab.write_inventory(inv)
    # An address of the lab's subnet where nothing listens: connection refused.
    inv.write_text(inv.read_text() + f'\n[hosts.ghost]\naddress = "127.0.{LAB_SUBNET}.250"\nport = 22\n'
                                      f'user = "{lab.hosts[0].user}"\n')
    p = sshjobs("run", "-i", inv, f"{jobs}:echo", "1", "--json")
    assert p.returncode == 1
    rows = json_lines(p.stdout)
    assert len(rows) == 11
    assert all(r["ok"] for r in rows[:10])
    assert rows[10]["host"] == "ghost" and rows[10]["error"]["type"] == "ConnectionRefused"

    ping = sshjobs("ping", "-i", inv, "--json")
    assert ping.returncode == 1
    ghost = json_lines(ping.stdout)[10]
    assert ghost["reachable"] is False and ghost["ok"] is False and "ConnectionRefused" in ghost["error"]


def _with_ghosts(lab, path, count: int) -> Path:
    """The lab's inventory plus ``count`` hosts where nothing listens (connection refused)."""
    lab.write_inventory(path)
    path.write_text(path.read_text() + "".join(
        f'\n[hosts.ghost{i}]\naddress = "127.0.{LAB_SUBNET}.{249 + i}"\nport = 22\nuser = "{lab.hosts[0].user}"\n'
        for i in range(1, count + 1)))
    return path


def test_map_exits_1_and_names_the_failed_hosts_when_the_others_ran_every_item(lab, jobs, tmp_path, faults):
    inv = _with_ghosts(lab, tmp_path / "ghosts.toml", 3)
    with faults.inject("three unreachable hosts under a CLI map"):
        p = sshjobs("map", "-i", inv, "-l", "node01,ghost*", f"{jobs}:echo", "--range", "5")
        assert p.returncode == 1, p.stdout + p.stderr
        lines = p.stdout.splitlines()
        assert [ln.split()[:3] for ln in lines[:5]] == [[f"job-{i}", "node01", "ok"] for i in range(5)]
        assert lines[5].startswith("5 of 5 jobs ok (1 host, ") and lines[5].endswith("; 3 hosts failed:"), lines
        for i, line in enumerate(lines[6:9], 1):
            assert line.split(None, 2) == [f"ghost{i}",
                                           "ConnectionRefused:",
                                           f"{lab.hosts[0].user}@127.0.{LAB_SUBNET}.{249 + i}:22: connection refused"]
        assert len(lines) == 9
        p = sshjobs("map", "-i", inv, "-l", "node01,ghost*", f"{jobs}:echo", "--range", "5", "--json")
        assert p.returncode == 1 and [r["value"] for r in json_lines(p.stdout) if r["ok"]] == list(range(5))


def test_an_empty_limit_is_a_usage_error_and_no_items_exit_0_contacting_nothing(lab, jobs, tmp_path):
    inv = _with_ghosts(lab, tmp_path / "ghosts.toml", 1)
    for limit in [",", "", " , "]:
        p = sshjobs("map", "-i", inv, "-l", limit, f"{jobs}:echo", "--range", "3")
        assert p.returncode == 2, (limit, p.stdout, p.stderr)
        assert f"--limit {limit!r} names no host or group" in p.stderr and p.stdout == ""
    empty = tmp_path / "none.jsonl"
    empty.write_text("\n")
    # only the ghost: a connect would fail and say so
    for items in [["--range", "0"], ["--args", empty]]:
        p = sshjobs("map", "-i", inv, "-l", "ghost1", f"{jobs}:echo", *items)
        assert (p.returncode, p.stdout, p.stderr) == (0, "0 items: nothing to run, no host contacted\n", "")
        p = sshjobs("map", "-i", inv, "-l", "ghost1", f"{jobs}:echo", *items, "--json")
        assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


# -- ping, exec, inventory ------------------------------------------------------------------------
def test_ping_reports_reachability_auth_python_and_times(lab, invfile):
    p = sshjobs("ping", "-i", invfile, "--json")
    assert p.returncode == 0, p.stderr
    rows = json_lines(p.stdout)
    assert [r["host"] for r in rows] == [h.name for h in lab.hosts]
    for r in rows:
        assert r["ok"] and r["reachable"] and r["auth"]
        assert re.fullmatch(r"3\.%d\.\d+" % sys.version_info[1], r["python"])  # the minor must match
        assert 0 < r["rtt"] < 5 and 0 < r["connect_time"] < 10 and 0 < r["start_time"] < 30
    plain = sshjobs("ping", "-i", invfile)
    header = plain.stdout.splitlines()[0].split()
    assert header == ["host", "target", "reachable", "auth", "python", "rtt", "connect", "start", "error"]
    assert "10 of 10 hosts answered" in plain.stdout


def test_exec_groups_identical_outputs_and_reports_exit_codes(lab, invfile):
    odd_one = lab.hosts[2].user
    cmd = f'if [ "$(id -un)" = {odd_one} ]; then echo different; echo oops >&2; exit 3; fi; echo same; uname -s'
    p = sshjobs("exec", "-i", invfile, "--", cmd)
    assert p.returncode == 1
    out = p.stdout
    assert out.count("same\nLinux\n") == 1  # printed once for the nine hosts
    assert "---------------- node[01-02,04-10] (9)\nsame\nLinux\n" in out
    assert "---------------- node03 (1)  exit 3\ndifferent\noops\n" in out
    assert out.splitlines()[-1] == "exit codes: 0 on node[01-02,04-10]; 3 on node03"

    j = sshjobs("exec", "-i", invfile, "--json", "--", cmd)
    rows = json_lines(j.stdout)
    assert [r["exit_status"] for r in rows] == [0, 0, 3, 0, 0, 0, 0, 0, 0, 0]
    assert rows[2]["stdout"] == "different\n" and rows[2]["stderr"] == "oops\n"
    assert rows[0]["ok"] and not rows[2]["ok"]

    # several words are quoted one by one, as the user typed them
    ok = sshjobs("exec", "-i", invfile, "--limit", "odd", "--", "printf", "%s|", "a b", "$HOME")
    assert ok.returncode == 0
    assert "---------------- node[01,03,05,07,09] (5)\na b|$HOME|\n" in ok.stdout


def test_exec_timeout_kills_the_command(lab, invfile):
    t0 = time.monotonic()
    p = sshjobs("exec", "-i", invfile, "--limit", "node04", "--timeout", "1", "--json", "--", "sleep 60")
    assert p.returncode == 1
    (row,) = json_lines(p.stdout)
    assert row["error"].startswith("Timeout")
    assert time.monotonic() - t0 < 20
    assert not wait_no_processes([lab.hosts[3].user])


def test_inventory_shows_the_parsed_hosts(lab, invfile):
    p = sshjobs("inventory", "-i", invfile, "--limit", "odd")
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["host", "address", "port", "user", "groups", "slots", "python", "workdir", "env"]
    assert [ln.split()[0] for ln in lines[1:]] == ["node01", "node03", "node05", "node07", "node09"]
    rows = json_lines(sshjobs("inventory", "-i", invfile, "--json").stdout)
    assert [(r["host"], r["address"], r["user"]) for r in rows] == [(h.name, h.address, h.user) for h in lab.hosts]
    assert rows[1]["groups"] == ["lab", "even"]


# -- terminal vs pipe, Ctrl-C ------------------------------------------------------------------------
def _run_in_pty(args: list[str], timeout: float = 120) -> tuple[int, str]:
    pid, fd = pty.fork()
    if pid == 0:  # child: stdout and stderr are the terminal, 40x160
        try:
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
            env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
            env["TERM"] = "xterm-256color"
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "sshjobs", *args], env)
        finally:
            os._exit(127)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_gets_the_live_display_and_a_result_table(invfile, jobs):
    code, out = _run_in_pty(["run", "-i", invfile, f"{jobs}:nap", "0.8"])
    assert code == 0, out
    assert "\x1b[" in out  # rich: styles and cursor movement
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out).replace("\r", "")
    # the live display drew each host's state while the jobs ran
    assert re.search(r"^node\d\d +running +1 ", plain, re.M)
    assert re.search(r"10 hosts: .*running .*jobs: [1-9]\d* running", plain)
    assert re.search(r"job\s+host\s+value\s+duration", plain)
    assert "✓ node10" in plain
    assert "10 of 10 jobs ok" in plain


def test_ctrl_c_exits_130_and_leaves_no_job_behind(lab, invfile, jobs):
    proc = subprocess.Popen([sys.executable, "-m", "sshjobs", "run", "-i", invfile, f"{jobs}:nap", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    users = [h.user for h in lab.hosts]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the jobs run on the hosts
        out = subprocess.run(["ps", "-eo", "user:32,args"], capture_output=True, text=True).stdout
        if sum(1 for ln in out.splitlines() if ln.split()[0] in users and "python3 -c" in ln) >= 10:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not wait_no_processes(users, timeout=10)


# -- lab up / down ------------------------------------------------------------------------------------------
def test_lab_up_and_down(tmp_path, root):
    directory, out = tmp_path / "lab", tmp_path / "lab.toml"
    # 127.0.<subnet>.201-202: the session lab has .1-.10 of the same subnet
    up = ["lab", "up", "--hosts", "2", "--dir", directory, "--out", out, "--subnet", LAB_SUBNET,
          "--offset", "200", "--prefix", f"sshjobs-t{LAB_SUBNET}c-"]
    try:
        p = sshjobs(*up)
        assert p.returncode == 0, p.stderr
        assert f"127.0.{LAB_SUBNET}.201-202" in p.stdout
        pids = [h["pid"] for h in json.loads((directory / "lab.json").read_text())["hosts"]]
        assert all(Path(f"/proc/{pid}").exists() for pid in pids)
        again = sshjobs(*up)
        assert again.returncode == 1 and "a lab is already running" in again.stderr
        ping = sshjobs("ping", "-i", out, "--json")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert [r["host"] for r in json_lines(ping.stdout)] == ["node01", "node02"]
    finally:
        down = sshjobs("lab", "down", "--dir", directory)
    assert down.returncode == 0
    assert "stopped 2 servers (node[01-02])" in down.stdout
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert "stopped 0 servers" in sshjobs("lab", "down", "--dir", directory).stdout


def test_lab_down_leaves_a_pid_that_is_no_longer_the_labs_sshd_alone(tmp_path):
    directory = tmp_path / "lab"
    (directory / "node01").mkdir(parents=True)
    other = subprocess.Popen(["sleep", "30"])
    try:
        (directory / "lab.json").write_text(json.dumps({"inventory": "x", "hosts": [
            {"name": "node01", "pid": other.pid}]}))
        assert Lab.stop_recorded(directory) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_python_dash_m_and_the_console_script(invfile):
    assert sshjobs("--version").stdout.strip() == "sshjobs, version 0.1.0"
    script = Path(sys.executable).parent / "sshjobs"
    p = subprocess.run([script, "inventory", "-i", invfile, "--json"], capture_output=True, text=True)
    assert p.returncode == 0 and len(json_lines(p.stdout)) == 10


# -- install and the demo (the dependency issue) --------------------------------------------------------------
def test_install_then_run_a_job_importing_it(invfile, jobs, tmp_path):
    p = sshjobs("install", "-i", invfile, "--limit", "node01,node02", "six", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json_lines(p.stdout)
    assert [r["host"] for r in rows] == ["node01", "node02"] and all(r["ok"] for r in rows)
    again = sshjobs("install", "-i", invfile, "--limit", "node01,node02", "six")
    assert again.returncode == 0
    assert re.search(rf"^node01 +ok .* env {rows[0]['value']['hash']} already there: /", again.stdout, re.M)
    jobfile = tmp_path / "usesix.py"
    jobfile.write_text("def version(_=None):\n    import six\n    return six.__version__\n")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# the job's needs\nsix  # pure python\n")
    p = sshjobs("run", "-i", invfile, "--limit", "node01,node02", "-r", reqs, f"{jobfile}:version", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert all(r["ok"] and r["value"] for r in json_lines(p.stdout))


def test_install_then_run_and_map_use_the_environment_until_forgotten(lab, tmp_path):
    invfile = lab.write_inventory(tmp_path / "hosts.toml")
    workdir = f".cache/sshjobs-{uuid.uuid4().hex[:8]}"  # hosts that have no environment yet
    invfile.write_text(invfile.read_text().replace('workdir = "~/.cache/sshjobs"', f'workdir = "~/{workdir}"'))
    try:
        _install_then_run(invfile, tmp_path)
    finally:
        for i in range(len(lab.hosts)):
            shutil.rmtree(lab.home(i) / workdir, ignore_errors=True)


def _install_then_run(invfile, tmp_path):
    jobfile = tmp_path / "hum.py"
    jobfile.write_text("def f(x=0):\n    import humanize\n    return humanize.intcomma(1000 + x)\n")
    limit = ("--limit", "node07,node08")
    before = sshjobs("run", "-i", invfile, *limit, f"{jobfile}:f", "--json")
    assert before.returncode == 1 and "ModuleNotFoundError" in before.stdout
    p = sshjobs("install", "-i", invfile, *limit, "humanize")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"Later commands with {invfile} run in this environment (humanize)" in p.stderr
    shown = json_lines(sshjobs("inventory", "-i", invfile, "--json").stdout)
    assert {tuple(r["requirements"]) for r in shown} == {("humanize",)}
    ran = sshjobs("run", "-i", invfile, *limit, f"{jobfile}:f", "--json")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert [r["value"] for r in json_lines(ran.stdout)] == ["1,000", "1,000"]
    mapped = sshjobs("map", "-i", invfile, *limit, f"{jobfile}:f", "--range", "3", "--json")
    assert [r["value"] for r in json_lines(mapped.stdout)] == ["1,000", "1,001", "1,002"]
    # a host the install did not reach gets the environment on its first command
    other = sshjobs("run", "-i", invfile, "--limit", "node09", f"{jobfile}:f", "--json")
    assert other.returncode == 0 and json_lines(other.stdout)[0]["value"] == "1,000", other.stdout + other.stderr
    forgot = sshjobs("install", "-i", invfile, "--forget")
    assert forgot.returncode == 0 and "forgot humanize" in forgot.stderr
    after = sshjobs("run", "-i", invfile, *limit, f"{jobfile}:f", "--json")
    assert after.returncode == 1 and "ModuleNotFoundError" in after.stdout


FLAKY = """
import os

def version(_=None):
    import iniconfig
    return iniconfig.__name__, os.path.dirname(os.path.dirname(iniconfig.__file__))

def flaky(item):
    folder, x = item
    mark = os.path.join(folder, str(x))
    if not os.path.exists(mark):  # the first attempt at each item loses its worker
        open(mark, "w").close()
        os._exit(3)
    return x * 10
"""


def test_run_install_offline_retries_and_args_from_stdin(lab, tmp_path, root):
    invfile = lab.write_inventory(tmp_path / "hosts.toml")
    workdir = f".cache/sshjobs-{uuid.uuid4().hex[:8]}"  # hosts that have no environment yet
    invfile.write_text(invfile.read_text().replace('workdir = "~/.cache/sshjobs"', f'workdir = "~/{workdir}"'))
    jobfile = tmp_path / "flaky.py"
    jobfile.write_text(FLAKY)
    folder = tempfile.mkdtemp(prefix="sshjobs-flaky-", dir="/tmp")
    os.chmod(folder, 0o1777)  # shared by the hosts' users: a retry elsewhere sees the mark
    try:
        # --install: installed first, then the job runs in that environment
        p = sshjobs("run", "-i", invfile, "--limit", "node05", "--install", "iniconfig", f"{jobfile}:version", "--json")
        assert p.returncode == 0, p.stdout + p.stderr
        (row,) = json_lines(p.stdout)
        assert row["value"][0] == "iniconfig" and f"/{workdir}/envs/" in row["value"][1]
        # --offline: wheels downloaded here, uploaded, installed with no index
        p = sshjobs("run", "-i", invfile, "--limit", "node06", "--offline", "--install", "iniconfig",
                    f"{jobfile}:version", "--json")
        assert p.returncode == 0, p.stdout + p.stderr
        assert json_lines(p.stdout)[0]["value"][0] == "iniconfig"
        assert any(w.name.startswith("iniconfig-") for w in (lab.home(5) / workdir / "wheels").iterdir())
        # --args - reads the items from stdin; --retries 1 runs each lost item again
        items = "".join(json.dumps([folder, x]) + "\n" for x in range(4))
        p = sshjobs("map", "-i", invfile, "--limit", "node05,node06", f"{jobfile}:flaky", "--args", "-",
                    "--retries", "1", "--json", input=items)
        assert p.returncode == 0, p.stdout + p.stderr
        rows = json_lines(p.stdout)
        # every item's first run lost its worker, so a value is a run again
        assert [r["value"] for r in rows] == [x * 10 for x in range(4)]
        assert sorted(os.listdir(folder)) == ["0", "1", "2", "3"] and max(r["attempts"] for r in rows) == 2
        shutil.rmtree(folder)
        os.mkdir(folder)
        os.chmod(folder, 0o1777)
        p = sshjobs("map", "-i", invfile, "--limit", "node05,node06", f"{jobfile}:flaky", "--args", "-",
                    "--json", input=items)
        assert p.returncode == 1
        assert not all(r["ok"] for r in json_lines(p.stdout))  # no retries: the items that lost their worker fail
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for i in range(len(lab.hosts)):
            shutil.rmtree(lab.home(i) / workdir, ignore_errors=True)


def test_env_list_and_prune(lab, tmp_path):
    # a workdir of its own, so that pruning leaves the other tests' environments alone
    invfile = lab.write_inventory(tmp_path / "envtest.toml")
    invfile.write_text(invfile.read_text().replace('workdir = "~/.cache/sshjobs"',
                                                   'workdir = "~/.cache/sshjobs-envtest"'))
    sshjobs("env", "prune", "-i", invfile, "--limit", "node06", "--older-than", "0s")  # a previous run's
    p = sshjobs("install", "-i", invfile, "--limit", "node06", "six", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    env_hash = json_lines(p.stdout)[0]["value"]["hash"]
    listed = sshjobs("env", "list", "-i", invfile, "--limit", "node06", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json_lines(listed.stdout)
    assert [(e["hash"], e["requirements"], e["complete"]) for e in row["value"]] == [(env_hash, ["six"], True)]
    plain = sshjobs("env", "list", "-i", invfile, "--limit", "node06")
    assert re.search(rf"^node06 +{env_hash[:12]} +six ", plain.stdout, re.M)

    kept = json_lines(sshjobs("env", "prune", "-i", invfile, "--limit", "node06", "--older-than", "1d",
                              "--json").stdout)
    assert (kept[0]["value"]["removed"], kept[0]["value"]["kept"]) == ([], [env_hash])
    pruned = json_lines(sshjobs("env", "prune", "-i", invfile, "--limit", "node06", "--older-than", "0s",
                                "--json").stdout)
    assert pruned[0]["value"]["removed"] == [env_hash]
    assert json_lines(sshjobs("env", "list", "-i", invfile, "--limit", "node06", "--json").stdout)[0]["value"] == []
    bad = sshjobs("env", "prune", "-i", invfile, "--older-than", "soon")
    assert bad.returncode == 2 and "not an age" in bad.stderr


def test_requirements_the_installer_refuses_exit_2_before_connecting(invfile, tmp_path, jobs):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("-e .\n")
    for args in (["install", "-i", invfile, "-r", reqs], ["run", "-i", invfile, "-r", reqs, f"{jobs}:echo", "1"]):
        p = sshjobs(*args)
        assert p.returncode == 2, p.stderr
        assert "unsupported requirements line (list the requirements instead): -e ." in p.stderr


def test_install_of_a_package_that_does_not_exist_exits_1(invfile):
    p = sshjobs("install", "-i", invfile, "--limit", "node03", "sshjobs-no-such-package-xyz", "--json")
    assert p.returncode == 1
    (row,) = json_lines(p.stdout)
    assert not row["ok"] and row["error"]["message"]


def test_the_demo_prints_the_seed_shape_with_the_in_process_values(lab):
    np = pytest.importorskip("numpy")  # noqa: F841  (the in-process reference needs numpy here)
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from eigen import eigen
    finally:
        sys.path.remove(str(ROOT / "examples"))
    p = subprocess.run([sys.executable, ROOT / "examples" / "demo.py", "-i", lab.inventory_path],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    start = lines.index("Waiting for 10 workers...")
    assert lines[start + 1] == "  found 10 workers"
    assert lines[start + 2] == "Installing numpy on 10 workers..."
    assert lines[start + 3: start + 13] == [f"  ✓ {h.name}" for h in lab.hosts]
    assert lines[start + 13] == "Submitting 10 jobs in parallel..."
    jobs = lines[start + 14: start + 24]
    hosts = []
    for job_id, line in enumerate(jobs):
        m = re.fullmatch(r"  job-(\d+) → (node\d\d)   eigenvalues: (\[.*\])", line)
        assert m, line
        assert int(m.group(1)) == job_id
        hosts.append(m.group(2))
        assert json.loads(m.group(3)) == eigen(job_id)["top_eigenvalues"]
    assert sorted(hosts) == [h.name for h in lab.hosts]  # one job per host
    assert re.fullmatch(r"All 10 jobs completed in \d+\.\d\ds", lines[start + 24])
