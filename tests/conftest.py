"""Fixtures: a running 10-host lab of real OpenSSH servers for the whole test session."""

from __future__ import annotations

import os
import subprocess
import time

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
    """Command lines of a lab user's processes (sshd's own session processes excluded)."""
    out = subprocess.run(["ps", "-u", user, "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip() and "sshd:" not in line]


def wait_no_processes(users, timeout=5.0) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        left = {u: user_processes(u) for u in users}
        left = {u: p for u, p in left.items() if p}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="session")
def root():
    if os.geteuid() != 0:
        pytest.skip("needs root: the lab's per-host users")
    return True

