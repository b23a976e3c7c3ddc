"""A cluster of OpenSSH containers (docker/compose.yml): the Docker fleet for tests and the demo.

Node i is the compose service ``nodeNN`` at a fixed address ``<net>.<10+i>`` port 22 on the
project's own bridge network, reached straight from the host through that bridge (no
published ports: the addresses behave like a real fleet, and ``docker network disconnect``
cuts a node off the way a partition would). Each container makes its own host key at start;
``up()`` reads every public host key with ``docker exec`` (the Docker API, not the network, so
nothing is trusted on first use) into a known_hosts file and writes an inventory.

``python -m sshjobs.dockerlab up|down|status`` is what ``make docker-up``/``docker-down`` run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from .errors import LabError
from .inventory import to_toml
from .provisioning import local_uv
from .remote.provision import uv_tls_env

DOCKER_DIR = Path(__file__).resolve().parent.parent / "docker"
BASE_IMAGE = "sshjobs/base:bookworm"
NODE_IMAGE = "sshjobs/node:latest"
PROJECT = "sshjobs"
NET = "172.31.66"  # first three octets; node i is NET.(10+i)
USER = "sshjobs"


class DockerLabError(LabError):
    """The Docker cluster cannot be built, started or reached."""


def engine_problem() -> str | None:
    """None when a Docker engine answers, else why not (for skip messages)."""
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 20s"
    if proc.returncode != 0 or not proc.stdout.strip():
        return "no Docker engine answers (`docker info`: " + (proc.stderr.strip().splitlines() or ["failed"])[-1] + ")"
    return None


def compose_command() -> list[str]:
    """`docker compose` (v2 plugin) when present, else `docker-compose` (v1)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise DockerLabError("neither `docker compose` nor `docker-compose` is installed")


@dataclass
class DockerHost:
    name: str
    address: str
    port: int = 22
    user: str = USER
    workdir: str = "~/.cache/sshjobs"


def _run(cmd: list[str], *, env: dict | None = None, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise DockerLabError(f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


class DockerLab:
    """``DockerLab().up()`` ... ``down()``: ten sshd containers, their known_hosts and an inventory.

    ``directory`` keeps the client key, authorized_keys and known_hosts; ``project`` is the
    compose project name (every container, the network and the images carry it, so cleanup
    touches nothing else); ``net`` the first three octets of the project's /24 network.
    """

    def __init__(self, directory: str | os.PathLike = ".docker", *, project: str = PROJECT, net: str = NET,
                 hosts: int = 10, inventory_path: str | os.PathLike | None = None,
                 docker_dir: str | os.PathLike = DOCKER_DIR):
        if hosts != 10:
            raise DockerLabError("docker/compose.yml defines exactly 10 nodes")
        self.dir = Path(directory).resolve()
        self.project = project
        self.net = net
        self.docker_dir = Path(docker_dir)
        self.compose_file = self.docker_dir / "compose.yml"
        self.inventory_path = Path(inventory_path or self.dir / "hosts.toml").resolve()
        self.hosts = [DockerHost(f"node{i:02d}", f"{net}.{10 + i}") for i in range(1, hosts + 1)]
        self._ids: dict[str, str] = {}
        self.offline_reason: str | None = None  # why the nodes cannot use the package index

    @property
    def identity(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def network(self) -> str:
        return f"{self.project}_nodes"

    def env(self) -> dict[str, str]:
        """The variables docker/compose.yml reads (for any compose call on this project)."""
        return {"SSHJOBS_DOCKER_NET": self.net, "SSHJOBS_DOCKER_KEYS": str(self.dir), "SSHJOBS_NODE_IMAGE": NODE_IMAGE}

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        cmd = [*compose_command(), "-f", str(self.compose_file), "-p", self.project, *args]
        return _run(cmd, env={**os.environ, **self.env()}, check=check, timeout=timeout)

    # -- set-up -----------------------------------------------------------------
    def prepare(self) -> None:
        """The client key and the authorized_keys file the containers mount."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.identity.exists():
            self.identity.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh"))
            self.identity.chmod(0o600)
        public = asyncssh.read_private_key(str(self.identity)).export_public_key("openssh")
        auth = self.dir / "authorized_keys"
        auth.write_bytes(public)
        auth.chmod(0o644)

    def build(self) -> None:
        """The base image (registry or debootstrap; cached by tag) and the node image."""
        base = subprocess.run([str(self.docker_dir / "build-base.sh")], env={**os.environ, "BASE_TAG": BASE_IMAGE})
        if base.returncode != 0:
            raise DockerLabError("building the base image failed (docker/build-base.sh)")
        _run(["docker", "build", "-q", "-t", NODE_IMAGE, "--label", f"com.docker.compose.project={PROJECT}",
              "--build-arg", f"BASE={BASE_IMAGE}", str(self.docker_dir)], timeout=1800)

    def up(self, timeout: float = 60.0) -> "DockerLab":
        self.prepare()
        self.build()
        self.compose("up", "-d", "--remove-orphans")
        self.ready(timeout)
        return self

    def ready(self, timeout: float = 60.0) -> "DockerLab":
        """Wait for every node's SSH banner, collect host keys, probe the package index (see
        index_problem), write the inventory (``offline = true`` when the nodes cannot use it)."""
        self._ids = {}
        self.wait_banner(timeout=timeout)
        self.collect_host_keys()
        self.offline_reason = self.index_problem()
        self.write_inventory()
        return self

    def wait_banner(self, names: list[str] | None = None, timeout: float = 60.0) -> None:
        """Ready means the SSH banner arrives through the bridge, not a TCP accept."""
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            if names is not None and host.name not in names:
                continue
            while not banner(host.address, host.port):
                if time.monotonic() > deadline:
                    logs = self.compose("logs", "--tail", "20", host.name, check=False).stdout
                    raise DockerLabError(f"{host.name} ({host.address}) did not answer SSH within {timeout:g}s\n{logs}")
                time.sleep(0.1)

    def container(self, name: str) -> str:
        """The container id of service ``name`` (one `docker ps` for all of them)."""
        if name not in self._ids:
            out = _run(["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}",
                        "--format", '{{.Label "com.docker.compose.service"}} {{.ID}}']).stdout
            self._ids = dict(line.split() for line in out.splitlines() if line.strip())
            if name not in self._ids:
                raise DockerLabError(f"no container for {name} in project {self.project}")
        return self._ids[name]

    def host_key(self, name: str) -> str:
        out = _run(["docker", "exec", self.container(name), "cat", "/etc/ssh/ssh_host_ed25519_key.pub"]).stdout
        return " ".join(out.split()[:2])

    def collect_host_keys(self) -> Path:
        with concurrent.futures.ThreadPoolExecutor(len(self.hosts)) as pool:
            keys = list(pool.map(self.host_key, [h.name for h in self.hosts]))
        lines = [f"{h.address} {key}\n" for h, key in zip(self.hosts, keys)]
        self.known_hosts.write_text("".join(lines))
        return self.known_hosts

    def write_inventory(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path or self.inventory_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        defaults = {"user": USER, "identity": os.path.relpath(self.identity, path.parent),
                    "known_hosts": os.path.relpath(self.known_hosts, path.parent), "slots": 1, "connect_timeout": 10}
        comment = f"The Docker cluster (docker/compose.yml, project {self.project}), written by sshjobs.dockerlab"
        if self.offline_reason:
            defaults["offline"] = True
            comment += (f"\nThe nodes cannot use the package index ({self.offline_reason}):"
                        "\nsshjobs ships wheels from the controller instead (offline = true).")
        hosts = {h.name: {"address": h.address, "groups": ["docker", "even" if (i + 1) % 2 == 0 else "odd"]}
                 for i, h in enumerate(self.hosts)}
        path.write_text(to_toml(defaults, hosts, comment))
        return path

    def index_problem(self, timeout: float = 10.0) -> str | None:
        """None when uv on node01 resolves a package from the index uv would use there, else
        what went wrong.

        The controller's uv binary is copied into the container (as installs upload it) and
        resolves ``pip`` with the node's own configuration and environment, trusting the
        system store as installs do: the probe asks the index the installs would ask, and
        no index address is written here.
        """
        uv = local_uv()
        if uv is None:
            return "no uv on the controller to probe the index with"
        node, probe = self.container(self.hosts[0].name), "/tmp/sshjobs-uv-probe"
        copied = _run(["docker", "cp", uv, f"{node}:{probe}"], check=False, timeout=60)
        if copied.returncode != 0:
            return f"cannot copy uv into {self.hosts[0].name}: {copied.stderr.strip()[-200:]}"
        env = {"UV_HTTP_TIMEOUT": str(int(timeout)), "UV_HTTP_RETRIES": "0", "UV_NO_CACHE": "1"}  # the index, once, soon
        # the system store unless the node's env decides, as remote/provision.py does
        tls = " ".join(f"{k}={v}" for k, v in uv_tls_env(_run([uv, "--version"]).stdout, {}).items())
        version = "%d.%d" % sys.version_info[:2]  # the nodes' Python must be the controller's
        script = (f'[ -n "${{UV_SYSTEM_CERTS+x}}${{UV_NATIVE_TLS+x}}" ] || export {tls}; cd && '
                  f"echo pip | {probe} pip compile - --quiet --no-header --python-version {version}")
        try:
            proc = _run(["docker", "exec", "-u", USER, *(a for k, v in env.items() for a in ("-e", f"{k}={v}")),
                         node, "sh", "-c", script], check=False, timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            return f"uv on {self.hosts[0].name} got no answer from the package index within {timeout + 30:g}s"
        finally:
            _run(["docker", "exec", node, "rm", "-f", probe], check=False)  # as root: docker cp made it root's
        if proc.returncode == 0:
            return None
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        causes = [line for line in lines if line.startswith(("cause:", "error:"))] or lines or ["failed"]
        return causes[-1].removeprefix("cause: ")[:300]

    # -- faults -----------------------------------------------------------------
    def kill(self, name: str) -> None:
        _run(["docker", "kill", self.container(name)])

    def start(self, name: str, timeout: float = 30.0) -> None:
        """Start a killed node again (same container, same host key)."""
        _run(["docker", "start", self.container(name)])
        self.wait_banner([name], timeout)

    def pause(self, name: str) -> None:
        _run(["docker", "pause", self.container(name)])

    def unpause(self, name: str) -> None:
        _run(["docker", "unpause", self.container(name)])

    def disconnect(self, name: str) -> None:
        _run(["docker", "network", "disconnect", "--force", self.network, self.container(name)])

    def connect(self, name: str) -> None:
        host = next(h for h in self.hosts if h.name == name)
        _run(["docker", "network", "connect", "--ip", host.address, self.network, self.container(name)])

    def exec(self, name: str, *cmd: str, user: str = USER) -> str:
        return _run(["docker", "exec", "-u", user, self.container(name), *cmd]).stdout

    # -- tear-down --------------------------------------------------------------
    def down(self, images: bool = False) -> None:
        """Remove this project's containers and network (and with ``images`` its images)."""
        self.compose("down", "-v", "--remove-orphans", "-t", "2")
        self._ids = {}
        if images:
            for image in (NODE_IMAGE, BASE_IMAGE):
                _run(["docker", "image", "rm", image], check=False)
            # older node builds left untagged by a rebuild carry the project label too
            _run(["docker", "image", "prune", "-f", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                 check=False)


def banner(address: str, port: int = 22, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4) == b"SSH-"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sshjobs.dockerlab", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=".docker", help="client key, authorized_keys, known_hosts (default .docker)")
    parser.add_argument("--out", default="inventory/docker.toml", help="inventory to write (default inventory/docker.toml)")
    parser.add_argument("--project", default=PROJECT, help=f"compose project name (default {PROJECT})")
    parser.add_argument("--net", default=NET, help=f"first three octets of the node network (default {NET})")
    parser.add_argument("--images", action="store_true", help="down: remove the node and base images too")
    args = parser.parse_args(argv)
    problem = engine_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    lab = DockerLab(args.dir, project=args.project, net=args.net, inventory_path=args.out)
    try:
        if args.command == "up":
            t0 = time.monotonic()
            lab.up()
            print(f"{len(lab.hosts)} nodes up in {time.monotonic() - t0:.1f}s "
                  f"({lab.hosts[0].address}..{lab.hosts[-1].address}); inventory: {args.out}")
            if lab.offline_reason:
                print(f"the nodes cannot use the package index ({lab.offline_reason}): "
                      "the inventory sets offline = true (wheels shipped from here)")
            else:
                print("the nodes reach the package index: packages install online")
        elif args.command == "down":
            lab.down(images=args.images)
            print(f"removed project {args.project}'s containers and network" + (" and images" if args.images else ""))
        else:
            print(lab.compose("ps").stdout, end="")
    except DockerLabError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
