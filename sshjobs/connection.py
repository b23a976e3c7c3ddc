"""SSH connections to one host: asyncssh, verified host keys, MaxSessions-aware channels."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shlex
import socket
from dataclasses import dataclass, replace

import asyncssh

from .errors import (AuthenticationError, ConfigError, ConnectError, ConnectFailed, ConnectionRefused, ConnectTimeout,
                     HostKeyError, HostLost, HostNameError)
from .inventory import Host, local_user
from .log import get_logger

log = get_logger("sshjobs.connection")

# aes128-gcm moved 1.6-1.8x more bytes/s than asyncssh's default chacha20 here.
ENCRYPTION_ALGS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
]

# Errors worth another try: sshd drops unauthenticated connections beyond
# MaxStartups, which the client sees as a reset or a closed connection.
_RETRYABLE = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, asyncssh.ConnectionLost)


def shell_word(path: str) -> str:
    """Quote a path for a POSIX shell, keeping a leading ~/ meaning the home directory."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def connect_options(host: Host) -> dict:
    opts: dict = {
        "encryption_algs": ENCRYPTION_ALGS,
        "compression_algs": None,
        "connect_timeout": host.connect_timeout,
        "keepalive_interval": host.keepalive_interval,
        "keepalive_count_max": 3,
    }
    if host.user:
        opts["username"] = host.user
    if host.port:
        opts["port"] = host.port
    if host.identity:
        opts["client_keys"] = [host.identity]
    if host.proxy_jump:
        opts["tunnel"] = host.proxy_jump  # asyncssh connects each hop, resolving it through the ssh config
    if host.ssh_config:
        opts["config"] = [host.ssh_config]
    if host.host_key_checking is False:
        opts["known_hosts"] = None
    elif host.known_hosts:
        opts["known_hosts"] = parsed_known_hosts(host.known_hosts)
    elif not host.ssh_config and not os.path.exists(os.path.expanduser("~/.ssh/config")):
        # what asyncssh would read (with an ssh config, UserKnownHostsFile may say otherwise)
        default = os.path.expanduser("~/.ssh/known_hosts")
        if os.path.isfile(default) and os.access(default, os.R_OK):
            opts["known_hosts"] = parsed_known_hosts(default)
    return opts


_KNOWN_HOSTS: dict[str, tuple[bytes, object]] = {}


def parsed_known_hosts(path: str):
    """A known_hosts file parsed once per process while its content is unchanged.  Given the
    file's name, asyncssh parses it again for every connection: with 100 hosts listed, that
    was 10,000 keys decoded, ~0.08 s of the controller's CPU to connect to 100 hosts (0.37-0.40
    -> 0.30-0.32 s).  The file is still read every time (its content, not its mtime,
    decides), so an edit counts at the next connect."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return path  # asyncssh reports the file as it always has
    hit = _KNOWN_HOSTS.get(path)
    if hit is not None and hit[0] == data:
        return hit[1]
    try:
        parsed = asyncssh.import_known_hosts(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, asyncssh.Error):
        return path
    _KNOWN_HOSTS[path] = (data, parsed)
    return parsed


def known_hosts_path(host: Host) -> str:
    return host.known_hosts or _resolved(host).known_hosts or os.path.expanduser("~/.ssh/known_hosts")


def known_host_entry(host: Host) -> str:
    """The known_hosts name of a host as asyncssh matches it (an alias's HostName and Port):
    ``addr`` on port 22, ``[addr]:port`` otherwise."""
    r = _resolved(host)
    return r.address if r.port == 22 else f"[{r.address}]:{r.port}"


def _resolved(host: Host) -> Host:
    """The host as the ssh config resolves it; as written when the config cannot be read
    (the connect itself then reports that)."""
    try:
        return host.resolved
    except ConfigError:
        return replace(host, user=host.user or local_user(), port=host.port or 22)


class _AcceptNewClient(asyncssh.SSHClient):
    """accept-new: a key not in known_hosts is accepted only when known_hosts has nothing at
    all for this host (first contact); a host it knows must show a key it lists."""

    def __init__(self, seen: dict):
        self.seen = seen

    def validate_host_public_key(self, host, addr, port, key) -> bool:
        if self.seen["known"]:
            return False  # a changed key: refused, as with strict checking
        self.seen["new_key"] = key
        return True


def accept_new_options(host: Host) -> tuple[dict, dict]:
    """asyncssh options for accept-new, and what the connect saw (``new_key`` to record).

    known_hosts is matched at connect time, against the name and the address really
    reached, so an entry under either counts as known."""
    path = known_hosts_path(host)
    seen = {"known": False, "new_key": None}

    def match(name, addr, port):
        if not os.path.exists(path):
            return [], [], []
        found = asyncssh.match_known_hosts(parsed_known_hosts(path), name, addr, port)
        seen["known"] = any(found)
        return found

    return {"known_hosts": match, "client_factory": lambda: _AcceptNewClient(seen)}, seen


def record_host_key(host: Host, key: asyncssh.SSHKey) -> None:
    """accept-new: append the key a host showed on first contact to known_hosts."""
    path = known_hosts_path(host)
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    line = f"{known_host_entry(host)} {key.export_public_key('openssh').decode().strip()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)
    log.warning("host key recorded on first contact (accept-new)", host=host.name,
                fingerprint=key.get_fingerprint(), known_hosts=path)


def describe_error(host: Host, exc: BaseException) -> ConnectError:
    """One clear sentence per way a connect fails, naming the host as the connection reached
    for it (an ssh_config alias's user@HostName:Port, and the jump hosts); never secrets."""
    resolved = _resolved(host)
    target = host.target + (f" via {resolved.proxy_jump}" if resolved.proxy_jump else "")
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        kh = resolved.known_hosts or "~/.ssh/known_hosts"
        return HostKeyError(f"{target}: host key not verified against {kh}: {exc.reason}")
    if isinstance(exc, asyncssh.PermissionDenied):
        return AuthenticationError(f"{target}: authentication failed for {resolved.user}: {exc.reason}")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ConnectTimeout(f"{target}: no SSH connection within {host.connect_timeout:g}s")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionRefused(f"{target}: connection refused")
    if isinstance(exc, socket.gaierror):
        return HostNameError(f"{target}: host name does not resolve: {exc}")
    if isinstance(exc, asyncssh.DisconnectError):
        return ConnectFailed(f"{target}: disconnected during login: {exc.reason}")
    if isinstance(exc, OSError):
        return ConnectFailed(f"{target}: {exc.strerror or exc}")
    return ConnectFailed(f"{target}: {type(exc).__name__}: {exc}")


def quick_acks(conn: asyncssh.SSHClientConnection) -> None:
    """Acknowledge the server's packets at once rather than after Linux's 40 ms delayed ACK.

    sshd leaves Nagle's algorithm on for sessions without a pty, so a small packet it sends
    while an earlier one is unacknowledged waits for that ACK; with the client delaying its
    ACKs, that cost 40 ms per connection at the first channel open (measured: 44 -> 4 ms),
    and can wherever a small reply follows another.  TCP_QUICKACK does not stick (the
    kernel drops back to delayed ACKs), so it is set again after each read."""
    option = getattr(socket, "TCP_QUICKACK", None)
    sock = conn.get_extra_info("socket")
    if option is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    setsockopt = sock.setsockopt
    received = conn.data_received  # bound method: the transport calls the instance's attribute

    def data_received(data, datatype=None):
        received(data, datatype)
        try:
            setsockopt(socket.IPPROTO_TCP, option, 1)
        except OSError:
            pass

    conn.data_received = data_received


async def open_connection(host: Host, attempts: int = 4) -> asyncssh.SSHClientConnection:
    """Connect and log in; a dropped connect (MaxStartups) is retried with backoff."""
    opts = connect_options(host)
    if host.host_key_checking is False:
        log.warning("host key checking is off: the host's identity is not verified", host=host.name)
    seen = None
    if host.host_key_checking == "accept-new":
        # First contact: take the key the host shows (trust on first use) and record it;
        # from then on the recorded key is checked and a changed key is refused.
        extra, seen = accept_new_options(host)
        opts.update(extra)
    # A dropped connect (sshd's MaxStartups during a burst) is tried again with jittered
    # exponential backoff until connect_timeout is spent, at least ``attempts`` times.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + host.connect_timeout
    delay = 0.1
    attempt = 0
    while True:
        attempt += 1
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(host.address, **opts), timeout=host.connect_timeout + 1
            )
            quick_acks(conn)
            if seen is not None and seen["new_key"] is not None:
                try:
                    record_host_key(host, seen["new_key"])
                except OSError as exc:
                    conn.close()
                    raise HostKeyError(f"{host.target}: cannot record the host key in"
                                       f" {known_hosts_path(host)}: {exc.strerror or exc}") from None
            return conn
        except (*_RETRYABLE, asyncssh.DisconnectError) as exc:
            final = isinstance(exc, (asyncssh.PermissionDenied, asyncssh.HostKeyNotVerifiable))
            pause = min(delay, 1.0) * (0.5 + random.random())
            if final or (attempt >= attempts and loop.time() + pause > deadline):
                raise describe_error(host, exc) from None
            log.debug("connect dropped, retrying", host=host.name, attempt=attempt, error=str(exc))
            await asyncio.sleep(pause)
            delay *= 2
        except (OSError, asyncio.TimeoutError, asyncssh.Error) as exc:
            raise describe_error(host, exc) from None


@dataclass
class Completed:
    """What a shell command left: exit status (None if it timed out), output, signal."""

    exit_status: int | None
    stdout: str
    stderr: str
    signal: str | None
    timed_out: bool = False


class HostLink:
    """All SSH connections to one host.  Channels are opened through ``acquire()``,
    which never puts more than ``max_sessions`` sessions on one connection.

    ``on_lost(reason)`` hears when one of its connections closes without ``close()`` (the
    host dropped it, or it stopped answering keepalives), even with no job running."""

    def __init__(self, host: Host, first: asyncssh.SSHClientConnection):
        self.host = host
        self._conns: list[list] = [[first, 0]]  # [connection, sessions in use]
        self._lock = asyncio.Lock()
        self.on_lost = None
        self.closing = False
        self._watchers = [asyncio.ensure_future(self._watch(first))]

    async def _watch(self, conn: asyncssh.SSHClientConnection) -> None:
        await conn.wait_closed()
        if not self.closing:
            log.debug("connection closed", host=self.host.name)
            if self.on_lost is not None:
                self.on_lost(f"{self.host.target}: connection lost: closed by the host or the network")

    @classmethod
    async def open(cls, host: Host) -> "HostLink":
        return cls(host, await open_connection(host))

    async def acquire(self) -> tuple[asyncssh.SSHClientConnection, "callable"]:
        """A connection with a free session slot, and the function that frees it."""
        async with self._lock:
            for entry in self._conns:
                if entry[1] < self.host.max_sessions:
                    break
            else:
                conn = await open_connection(self.host)
                entry = [conn, 0]
                self._conns.append(entry)
                self._watchers.append(asyncio.ensure_future(self._watch(conn)))
            entry[1] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                entry[1] -= 1

        return entry[0], release

    async def run(self, command: str, *, input: bytes | None = None, timeout: float | None = None):
        """Run a shell command; returns asyncssh's SSHCompletedProcess (bytes)."""
        conn, release = await self.acquire()
        try:
            return await conn.run(command, input=input, encoding=None, check=False, timeout=timeout)
        finally:
            release()

    async def run_json(self, command: str, data: bytes):
        """Run a bundle (``command``, its request on stdin) whose last line of output is a
        JSON reply: ``(reply, process)``, reply None when there is none; a dropped connection
        raises HostLost."""
        try:
            proc = await self.run(command, input=data)
        except (asyncssh.Error, OSError) as exc:
            raise HostLost(f"{self.host.target}: connection lost: {exc}") from None
        out = proc.stdout.decode("utf-8", "replace").strip()
        try:
            return json.loads(out.splitlines()[-1]), proc
        except (ValueError, IndexError):
            return None, proc

    async def exec(self, command: str, timeout: float | None = None) -> "Completed":
        """A shell command with the host's ``env``; on ``timeout`` its process group is
        killed (an SSH signal request) and what it printed so far is kept."""
        env = dict(self.host.env)
        line = f"{env_prefix(env)}sh -c {shlex.quote(command)}" if env else command
        conn, release = await self.acquire()
        try:
            proc = await conn.create_process(line, encoding="utf-8", errors="replace")
            try:
                done = await proc.wait(check=False, timeout=timeout)
            except asyncssh.TimeoutError as exc:
                proc.kill()
                return Completed(None, exc.stdout or "", exc.stderr or "", None, timed_out=True)
            finally:
                proc.close()
        finally:
            release()
        signal = done.exit_signal[0] if done.exit_signal else None
        status = done.exit_status if done.exit_status is not None else -1
        return Completed(status, done.stdout or "", done.stderr or "", signal)

    def close(self) -> None:
        self.closing = True
        for conn, _ in self._conns:
            conn.close()
        for task in self._watchers:
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*(c.wait_closed() for c, _ in self._conns), return_exceptions=True)


# Read when the interpreter starts (PATH finds it): only these go on a remote command line,
# which any user of the host can read (ps) and asyncssh logs; the others (tokens, proxies)
# travel inside the protocol and the remote side puts them in its environment.
EARLY_ENV = ("PYTHON", "LD_", "PATH")


def split_env(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(for the command line, for the protocol)"""
    early = {k: v for k, v in env.items() if k.startswith(EARLY_ENV)}
    return early, {k: v for k, v in env.items() if k not in early}


def env_prefix(env: dict[str, str]) -> str:
    """`env K=V ...` for a remote command line (sshd drops most client env requests)."""
    if not env:
        return ""
    return "env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " "


def exec_row(name: str, done: Completed | None, timeout: float | None, error: str | None = None) -> dict:
    """``sshjobs exec``'s row of one host: what its command left (``done``: exit status, output,
    a timeout, a signal), or why it did not run (``error``)."""
    row: dict = {"host": name, "ok": False, "exit_status": None, "stdout": "", "stderr": "", "error": error,
                 "duration": 0.0}
    if done is not None:
        row.update(exit_status=done.exit_status, stdout=done.stdout, stderr=done.stderr)
        if done.timed_out:
            row["error"] = f"Timeout: the command did not finish within {timeout:g}s"
        elif done.signal:
            row["error"] = f"killed by signal {done.signal}"
    row["ok"] = row["exit_status"] == 0 and row["error"] is None
    return row


async def run_line(link: HostLink, name: str, line: str, timeout: float | None) -> dict:
    """The exec row of ``line`` run on ``link`` (see ``exec_row``)."""
    try:
        done = await link.exec(line, timeout)
    except (asyncssh.Error, OSError) as exc:
        return exec_row(name, None, timeout, f"HostLost: {link.host.target}: {exc}")
    return exec_row(name, done, timeout)
