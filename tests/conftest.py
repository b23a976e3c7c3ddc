"""Fixtures: a running 10-host lab of real OpenSSH servers for the whole test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from sshjobs import Inventory
from sshjobs.lab import Lab

# The demo's lab uses 127.0.1.x and the users sshjobs-labNN; tests keep out of its way
# (and out of each other's, with SSHJOBS_LAB_SUBNET, when several checkouts test at once).
# Their users differ too: a lab writes its client key into its users' authorized_keys.
LAB_SUBNET = int(os.environ.get("SSHJOBS_LAB_SUBNET", "2"))
LAB_PREFIX = f"sshjobs-t{LAB_SUBNET}-"


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.fail("openssh-server is not installed: run `make system-deps`")
    lab = Lab(10, tmp_path_factory.mktemp("lab"), subnet=LAB_SUBNET, prefix=LAB_PREFIX).up()
    yield lab
    lab.down()


@pytest.fixture
def inv(lab) -> Inventory:
    return Inventory.load(lab.inventory_path)


def user_processes(user: str) -> list[str]:
    """Command lines of a lab user's processes, its sshd sessions ("sshd: USER@notty", one per
    connection left open) included: the lab's servers themselves run as root."""
    out = subprocess.run(["ps", "-u", user, "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def sshd_sessions(user: str) -> list[int]:
    """The pids of a lab user's sshd session processes ("sshd: USER@notty"): one per open
    connection, counted from outside the controller."""
    out = subprocess.run(["ps", "-u", user, "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "sshd:" in line and "@" in line]


def wait_no_processes(users, timeout=5.0) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        left = {u: user_processes(u) for u in users}
        left = {u: p for u, p in left.items() if p}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def quiet(users) -> None:
    """Wait until the hosts hold no process of an earlier test (a killed CLI's workers end
    a little after it), so that what a test counts is its own."""
    assert wait_no_processes(users, timeout=30) == {}


def host_path(lab, index: int, workdir: str) -> Path:
    """A host's workdir as seen from the controller (the lab's hosts share this machine)."""
    if workdir.startswith("~/"):
        return Path(os.path.expanduser(f"~{lab.hosts[index].user}")) / workdir[2:]
    return Path(workdir)


@pytest.fixture
def fresh_inv(lab):
    """``fresh_inv(names)``: the lab's hosts (a selection) with a workdir of their own, which
    is removed afterwards: hosts that have seen no sshjobs environment.
    ``fresh_inv.workdir(i)``: host i's, as the controller sees it."""
    tag = uuid.uuid4().hex[:8]
    hosts = Inventory.load(lab.inventory_path).hosts
    workdirs = [f"~/.cache/sshjobs-t{tag}" if lab.root else f"{h.workdir}-t{tag}" for h in hosts]

    def make(selection: str | None = None) -> Inventory:
        inv = Inventory([replace(h, workdir=wd) for h, wd in zip(hosts, workdirs)])
        return inv.select(selection) if selection else inv

    make.workdir = lambda i: host_path(lab, i, workdirs[i])
    yield make
    for i in range(len(hosts)):
        shutil.rmtree(make.workdir(i), ignore_errors=True)


@pytest.fixture
def shared():
    """A folder every lab host (each a user of its own) can write, outside pytest's private
    tmp folders: where jobs leave marks for the test to count."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="sshjobs-shared-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def root():
    if os.geteuid() != 0:
        pytest.skip("needs root: the lab's per-host users")
    return True



# -- the fault suite's ledger -------------------------------------------------------
class FaultLedger:
    """Counts real injected faults, the ones the system survived (every check after the
    fault passed) and results lost (a job that should have succeeded but did not)."""

    def __init__(self):
        self.injected = 0
        self.survived = 0
        self.lost = 0
        self.used = False

    class _Fault:
        def __init__(self, ledger, what):
            self.ledger = ledger
            self.what = what

        def __enter__(self):
            self.ledger.injected += 1
            return self

        def __exit__(self, etype, exc, tb):
            if etype is None:
                self.ledger.survived += 1
            return False

    def inject(self, what: str) -> "FaultLedger._Fault":
        """``with faults.inject("kill the worker"):`` inject it and check inside the block;
        the fault counts as survived when the block ends without an error."""
        self.used = True
        return self._Fault(self, what)

    def expect(self, results, expected: dict) -> None:
        """Results that must have arrived intact despite the fault: index -> value."""
        lost = [i for i, value in expected.items() if not (results[i].ok and results[i].value == value)]
        self.lost += len(lost)
        assert not lost, [(i, results[i]) for i in lost[:5]]


_LEDGER = FaultLedger()


@pytest.fixture(scope="session")
def faults() -> FaultLedger:
    return _LEDGER


def pytest_terminal_summary(terminalreporter):
    if _LEDGER.used:
        terminalreporter.write_line(
            f"faults: {_LEDGER.injected} injected, {_LEDGER.survived} survived, {_LEDGER.lost} results lost")


# -- The Docker backend: docker/compose.yml through pytest-docker --------------------------
# One compose project and network per lab subnet, so that parallel checkouts do not collide
# (and none touches `make docker-up`'s project "sshjobs").
DOCKER_PROJECT = f"sshjobstest{LAB_SUBNET}"
DOCKER_NET = f"172.31.{100 + LAB_SUBNET}"


@pytest.fixture(scope="session")
def docker_engine():
    """Skip (not error) every Docker test when no engine answers, unless the run requires
    the engine (SSHJOBS_REQUIRE_DOCKER=1, which CI sets): then its absence fails them."""
    from sshjobs.dockerlab import engine_problem

    problem = engine_problem()
    if problem and os.environ.get("SSHJOBS_REQUIRE_DOCKER") == "1":
        pytest.fail(f"SSHJOBS_REQUIRE_DOCKER=1 but no Docker engine answers: {problem}")
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def docker_compose_command(docker_engine) -> str:
    from sshjobs.dockerlab import compose_command

    return " ".join(compose_command())  # `docker-compose` (v1) here


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    from sshjobs.dockerlab import DOCKER_DIR

    return str(DOCKER_DIR / "compose.yml")


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return DOCKER_PROJECT


@pytest.fixture(scope="session")
def docker_prepared(docker_engine, tmp_path_factory):
    """Keys and images (the base image is built once, then cached by its tag) before `up`."""
    from sshjobs.dockerlab import DockerLab

    dlab = DockerLab(tmp_path_factory.mktemp("docker"), project=DOCKER_PROJECT, net=DOCKER_NET)
    dlab.prepare()
    dlab.build()
    # pytest-docker runs compose through a shell that inherits this environment.
    saved = {k: os.environ.get(k) for k in dlab.env()}
    os.environ.update(dlab.env())
    yield dlab
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def docker_setup(docker_prepared):
    # pytest-docker's default `up --build --wait` needs Compose v2; images are built already.
    return ["up -d --remove-orphans"]


@pytest.fixture(scope="session")
def docker_cleanup():
    return ["down -v --remove-orphans -t 2"]


@pytest.fixture(scope="session")
def docker_lab(docker_prepared, docker_services):
    """The 10 running containers: same interface as `lab` (hosts, known_hosts, inventory_path)."""
    from sshjobs.dockerlab import banner

    dlab = docker_prepared
    docker_services.wait_until_responsive(lambda: all(banner(h.address) for h in dlab.hosts),
                                          timeout=90, pause=0.2)
    return dlab.ready()


@pytest.fixture(params=["lab", pytest.param("docker", marks=pytest.mark.docker)])
def backend(request):
    """A cluster backend: the local sshd lab or the Docker containers."""
    return request.getfixturevalue("lab" if request.param == "lab" else "docker_lab")


@pytest.fixture
def binv(backend) -> Inventory:
    """`inv` for either backend."""
    return Inventory.load(backend.inventory_path)
