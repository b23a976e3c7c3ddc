"""A local lab of real OpenSSH servers: the test fleet and the demo's hosts.

Run as root, host i is its own sshd on 127.0.<subnet>.i port 22 and lets in only its own
non-root Unix user (created by the lab), so each "host" has its own home and caches.
Run as another user, every host is an sshd on 127.0.0.1 with its own port, all logging
in the current user, each with its own workdir.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from .errors import LabError
from .inventory import to_toml

SSHD = "/usr/sbin/sshd"
# A host setting, not the controller's: every lab host shares this machine's cores, and a
# BLAS thread per core in every worker thrashes them. Nothing else of the controller's
# environment reaches the hosts, so they meet the network as an ordinary machine would.
BLAS_ENV = "OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1"


@dataclass
class LabHost:
    name: str
    address: str
    port: int
    user: str
    workdir: str
    pid: int | None = None


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.export_private_key("openssh"))
    path.chmod(0o600)


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _ensure_user(name: str) -> None:
    if subprocess.run(["id", "-u", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True, capture_output=True)
    # useradd leaves the account locked ("account is locked"), which sshd refuses.
    subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)


def _install_key(user: str, public_key: bytes) -> None:
    import pwd

    pw = pwd.getpwnam(user)
    ssh = Path(pw.pw_dir) / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    keys = ssh / "authorized_keys"
    keys.write_bytes(public_key)
    for p in (ssh, keys):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    keys.chmod(0o600)


class Lab:
    """``Lab(10).up()`` ... ``lab.down()``, or ``with Lab(10) as lab:``.

    ``lab.inventory_path`` is a ready inventory (TOML) with the hosts, the lab's client key
    and a known_hosts file holding every server's host key.
    """

    def __init__(self, hosts: int = 10, directory: str | os.PathLike | None = None, *, subnet: int = 1,
                 prefix: str = "sshjobs-lab", inventory_path: str | os.PathLike | None = None,
                 sshd_options: dict | None = None, slots: int = 1, offset: int = 0):
        if not 1 <= hosts <= 250:
            raise LabError("a lab has 1 to 250 hosts")
        if not 0 <= offset <= 254 - hosts:
            raise LabError(f"host addresses 127.0.{subnet}.{offset + 1}-{offset + hosts} are out of range")
        self.offset = offset  # as root, host i listens on 127.0.<subnet>.<offset + i>
        self.n = hosts
        self.dir = Path(directory or ".lab").resolve()
        self.subnet = subnet
        self.prefix = prefix
        self.root = os.geteuid() == 0
        self.inventory_path = Path(inventory_path or self.dir / "hosts.toml").resolve()
        self.sshd_options = sshd_options or {}
        self.slots = slots
        self.hosts: list[LabHost] = []
        self.procs: list[subprocess.Popen] = []

    @property
    def identity(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, timeout: float = 20.0) -> "Lab":
        if not os.path.exists(SSHD):
            raise LabError(f"{SSHD} not found: install openssh-server (apt-get install openssh-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # lab users read authorized_keys from here
        if self.root:
            Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        if not self.identity.exists():
            _write_key(self.identity, asyncssh.generate_private_key("ssh-ed25519"))
        client = asyncssh.read_private_key(str(self.identity))
        auth = self.dir / "authorized_keys"
        auth.write_bytes(client.export_public_key("openssh"))
        auth.chmod(0o644)
        me = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        known = []
        self.hosts = []
        try:
            for i in range(1, self.n + 1):
                name = f"node{i:02d}"
                hdir = self.dir / name
                hdir.mkdir(exist_ok=True)
                hostkey = hdir / "ssh_host_ed25519_key"
                if not hostkey.exists():
                    _write_key(hostkey, asyncssh.generate_private_key("ssh-ed25519"))
                pub = asyncssh.read_private_key(str(hostkey)).export_public_key("openssh").decode().strip()
                if self.root:
                    address, port, user = f"127.0.{self.subnet}.{self.offset + i}", 22, f"{self.prefix}{i:02d}"
                    _ensure_user(user)
                    _install_key(user, auth.read_bytes())
                    workdir = "~/.cache/sshjobs"
                else:
                    address, port, user = "127.0.0.1", _free_port("127.0.0.1"), me
                    workdir = f"~/.cache/sshjobs-lab/{name}"
                host = LabHost(name, address, port, user, workdir)
                cfg = self._config(host, hdir)
                check = subprocess.run([SSHD, "-t", "-f", str(cfg)], capture_output=True, text=True)
                if check.returncode != 0:
                    raise LabError(f"sshd rejects {cfg}: {check.stderr.strip()}")
                log = open(hdir / "sshd.log", "ab")
                proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=log, start_new_session=True)
                log.close()
                host.pid = proc.pid
                self.procs.append(proc)
                self.hosts.append(host)
                known.append(f"{address if port == 22 else f'[{address}]:{port}'} {pub}\n")
            self.known_hosts.write_text("".join(known))
            self._wait_ready(timeout)
        except BaseException:
            self.down()
            raise
        self.write_inventory()
        (self.dir / "lab.json").write_text(json.dumps({
            "inventory": str(self.inventory_path),
            "hosts": [h.__dict__ for h in self.hosts],
        }, indent=1))
        return self

    def _config(self, host: LabHost, hdir: Path) -> Path:
        opts = {
            "ListenAddress": f"{host.address}:{host.port}",
            "HostKey": str(hdir / "ssh_host_ed25519_key"),
            "PidFile": str(hdir / "sshd.pid"),
            # as root each user's own ~/.ssh (the lab dir may be unreadable to them)
            "AuthorizedKeysFile": ".ssh/authorized_keys" if self.root else str(self.dir / "authorized_keys"),
            "AllowUsers": host.user,
            "UsePAM": "no",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "PubkeyAuthentication": "yes",
            "StrictModes": "no",
            "Subsystem": "sftp internal-sftp",
            "SetEnv": BLAS_ENV,
            "LogLevel": "ERROR",
        }
        opts.update(self.sshd_options)
        cfg = hdir / "sshd_config"
        cfg.write_text("".join(f"{k} {v}\n" for k, v in opts.items()))
        return cfg

    def _wait_ready(self, timeout: float) -> None:
        """Ready means the SSH banner arrives, not just a TCP accept."""
        deadline = time.monotonic() + timeout
        for host, proc in zip(self.hosts, self.procs):
            while True:
                if proc.poll() is not None:
                    log = (self.dir / host.name / "sshd.log").read_text(errors="replace").strip()
                    raise LabError(f"sshd for {host.name} ({host.address}:{host.port}) exited: {log[-500:]}")
                try:
                    with socket.create_connection((host.address, host.port), timeout=1) as s:
                        if s.recv(64).startswith(b"SSH-"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise LabError(f"sshd for {host.name} did not answer within {timeout:g}s")
                time.sleep(0.02)

    def write_inventory(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path or self.inventory_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        defaults = {"identity": os.path.relpath(self.identity, path.parent),
                    "known_hosts": os.path.relpath(self.known_hosts, path.parent),
                    "slots": self.slots, "connect_timeout": 10}
        hosts = {h.name: {"address": h.address, "port": h.port, "user": h.user, "workdir": h.workdir,
                          "groups": ["lab", "even" if (i + 1) % 2 == 0 else "odd"]}
                 for i, h in enumerate(self.hosts)}
        path.write_text(to_toml(defaults, hosts, "A local lab of OpenSSH servers, written by sshjobs.lab"))
        return path

    def down(self) -> None:
        """Stop this lab's servers, by pid."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    def home(self, index: int) -> Path:
        """The home directory of host ``index`` (from 0)."""
        return Path(os.path.expanduser(f"~{self.hosts[index].user}"))

    @staticmethod
    def _recorded(directory: str | os.PathLike) -> list[tuple[str, int]]:
        """(name, pid) of the recorded servers that still run as this lab's sshd.

        A running sshd rewrites its command line to one string such as
        ``sshd: /usr/sbin/sshd -D -e -f DIR/node01/sshd_config [listener] ...``, so the
        joined command line must name both sshd and this host's config.
        """
        directory = Path(directory).resolve()
        state = directory / "lab.json"
        if not state.exists():
            return []
        found = []
        for h in json.loads(state.read_text())["hosts"]:
            pid = h.get("pid")
            config = str(directory / h["name"] / "sshd_config").encode()
            try:
                cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ")
            except (OSError, TypeError, ValueError):
                continue
            if SSHD.encode() in cmdline and config in cmdline and _alive(pid):
                found.append((h["name"], pid))
        return found

    @staticmethod
    def recorded_inventory(directory: str | os.PathLike) -> Path:
        """The inventory written by the lab recorded in ``directory``."""
        state = Path(directory) / "lab.json"
        try:
            return Path(json.loads(state.read_text())["inventory"])
        except (OSError, ValueError, KeyError) as exc:
            raise LabError(f"{state}: no lab recorded here ({exc})") from None

    @staticmethod
    def running(directory: str | os.PathLike) -> list[str]:
        """Names of the hosts of a recorded lab in ``directory`` whose sshd still runs."""
        return [name for name, _ in Lab._recorded(directory)]

    @staticmethod
    def stop_recorded(directory: str | os.PathLike, timeout: float = 5.0) -> list[str]:
        """Stop the servers of a lab started by another process (``sshjobs lab down``);
        only pids that are still this lab's sshd are signalled."""
        directory = Path(directory).resolve()
        state = directory / "lab.json"
        if not state.exists():
            return []
        stopped = []
        for name, pid in Lab._recorded(directory):
            try:
                os.kill(pid, signal.SIGTERM)
                stopped.append((name, pid))
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for _, pid in stopped:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for h in json.loads(state.read_text())["hosts"]:
            (directory / h["name"] / "sshd.pid").unlink(missing_ok=True)
        state.unlink()
        return [name for name, _ in stopped]


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
