"""Runtime dependencies on the hosts: uv environments, cached by content, online and offline.

An environment is identified by a hash of (the host interpreter's version and path, the
sorted requirement set, the index options) and lives in ``<workdir>/envs/<hash>``.  The
host-side half is ``sshjobs.remote.provision``, run through ``python3 -c STUB`` with the
``PROVISION`` bundle: one command per step, JSON in and out.

Installing a set that is already there costs one round trip per host (``check``).
Otherwise the controller gets uv onto the host if it has none (uploads its own binary
when OS and architecture match), ships wheels for offline hosts, and asks the host to
``build``: under a file lock, in a temporary folder renamed into place on success.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import platform
import re
import secrets
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import asyncssh

from .remote import PROVISION, protocol, provision
from .connection import shell_word
from .errors import (ConfigError, HostError, HostLost, InstallError, OfflineError, PythonMismatch, UploadError,
                     WorkerStartError, make_error)
from .transfer import sftp_replace
from .hosts import HostState
from .log import get_logger
from .worker import stub_command
from .result import Result, failed
from .requirements import merge_requirements, parse_requirements, requirement_lines, requirement_name  # noqa: F401

log = get_logger("sshjobs.provisioning")

UV_METHODS = ("path", "workdir", "upload", "pip", "venv-pip")


# -- requirements: sshjobs.requirements ----------------------------------------------------


class EnvSpec:
    """A requirement set one host's jobs run in: ``reqs`` and option lines, parsed once."""

    __slots__ = ("reqs", "opts")

    def __init__(self, reqs: list[str], opts: list[str]):
        self.reqs, self.opts = reqs, opts

    @classmethod
    def parse(cls, requirements) -> "EnvSpec":
        return cls(*parse_requirements(requirements))

    def alias(self, python: str, env: dict[str, str]) -> str:
        """The name the host gives this environment (``<workdir>/envs/@ALIAS``) once it exists,
        from what the controller knows before contact: the interpreter command, the controller's
        Python (a worker must match it), the set and the inventory's index variables.  A
        worker's start command runs ``@ALIAS/bin/python`` when it is there, so a call whose
        environment exists starts straight in it."""
        import hashlib

        index = sorted((k, v) for k, v in env.items() if k in protocol.INDEX_ENV)
        blob = json.dumps([python, list(sys.version_info[:2]), self.reqs, self.opts, index])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- one step on one host ------------------------------------------------------------------
async def remote_call(state: HostState, request: dict, python: str | None = None) -> dict:
    """Run one provisioning request on a host with its ``env``; the reply, or the HostError that says why not."""
    python = python or state.base_python
    env = dict(state.host.env) | dict(state.env)  # what the workers get too
    cmd, late = stub_command(python, env)
    data = PROVISION.start(request.get("workdir")) + json.dumps(dict(request, env=late)).encode()
    reply, proc = await state.link.run_json(cmd, data)
    if reply is None:
        out = proc.stdout.decode("utf-8", "replace").strip()
        err = (proc.stderr or b"").decode("utf-8", "replace").strip()
        if proc.exit_status == 127 or "not found" in err[-300:]:
            raise WorkerStartError(f"{state.host.target}: cannot run {python}: {err[-300:]}") from None
        raise InstallError(f"{state.host.target}: {python} exited with status"
                           f" {proc.exit_status}: {(err or out)[-1000:]}") from None
    if not reply.get("ok"):
        error = make_error(reply.get("kind") or InstallError.kind, f"{state.host.target}: {reply.get('error')}")
        raise error if isinstance(error, HostError) else InstallError(error.message)
    return reply


def expected_hash(state: HostState, reqs: list[str], opts: list[str]) -> str | None:
    """The environment's id as the host will compute it, from the base worker's hello."""
    hello = state.hello
    if not all(k in hello for k in ("implementation", "realpath", "python", "index_env")):
        return None
    version = ".".join(map(str, hello["python"][:3]))
    pid = provision.python_id(hello["implementation"], version, hello["realpath"])
    return provision.env_hash(pid, reqs, list(opts) + list(hello["index_env"]))


async def quick_check(state: HostState, reqs: list[str], opts: list[str], alias: str | None = None) -> dict | None:
    """The no-op path: is the environment there?  One shell command, no Python start; it
    names the environment by ``alias`` too, for the next workers' start."""
    h = expected_hash(state, reqs, opts)
    if h is None:
        return None
    env = f"{state.host.workdir.rstrip('/')}/envs/{h}"
    marker = shlex.quote(provision.ENV_MARKER)
    link = f" && ln -sfn {h} ../@{alias}" if alias else ""
    cmd = f"cd {shell_word(env)} 2>/dev/null && test -f {marker} && touch {marker}{link} && pwd"
    try:
        proc = await state.link.run(cmd)
    except (asyncssh.Error, OSError) as exc:
        raise HostLost(f"{state.host.target}: connection lost: {exc}") from None
    path = proc.stdout.decode("utf-8", "replace").strip()
    if proc.exit_status != 0 or not path.startswith("/"):
        return None
    version = ".".join(map(str, state.hello["python"][:3]))
    return {"ok": True, "hash": h, "env": path, "python": f"{path}/bin/python", "version": version, "cached": True}


# -- uv ------------------------------------------------------------------------------------
def local_uv() -> str | None:
    """The controller's own uv binary (the `uv` package ships it), or None."""
    try:
        import uv

        return uv.find_uv_bin()
    except Exception:
        import shutil

        return shutil.which("uv")


def _local_libc() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return ""


def can_upload_uv(facts: dict) -> bool:
    """The controller's uv binary runs on a host of the same OS, architecture and libc family."""
    if not facts or facts.get("platform") != sys.platform or facts.get("machine") != platform.machine():
        return False
    mine = _local_libc().split(" ")[0]
    return mine == facts.get("libc", "").split(" ")[0] and local_uv() is not None


async def sftp_upload(state: HostState, files: Sequence[tuple[Path, str]], mode: int = 0o600) -> int:
    """Upload (local path, remote path) pairs: each to a temporary name, then renamed, so a
    reader (or another controller) never sees half a file.  Returns the bytes sent."""
    if not files:
        return 0
    conn, release = await state.link.acquire()  # an SFTP session counts against MaxSessions
    sent = 0
    try:
        async with conn.start_sftp_client() as sftp:
            for local, dest in files:
                tmp = f"{dest}.part-{secrets.token_hex(4)}"
                # put() keeps several writes in flight (2x a single write here); the
                # folder is already 0700, and the file gets its own mode before the rename
                await sftp.put(str(local), tmp)
                await sftp.chmod(tmp, mode)
                await sftp_replace(sftp, tmp, dest)
                sent += local.stat().st_size
    except (asyncssh.Error, OSError) as exc:
        raise UploadError(f"{state.host.target}: upload failed: {exc}") from None
    finally:
        release()
    return sent


async def upload_uv(state: HostState, workdir: str) -> None:
    path = Path(local_uv())
    await sftp_upload(state, [(path, f"{workdir}/bin/uv")], mode=0o700)


# -- offline: wheels for the host's platform -----------------------------------------------
def platform_args(facts: dict) -> list[str]:
    """pip download options selecting wheels for a host (its Python, ABI, OS, arch, glibc)."""
    major, minor = facts["version"].split(".")[:2]
    impl = "cp" if facts.get("implementation", "cpython") == "cpython" else "pp"
    args = ["--python-version", f"{major}.{minor}", "--implementation", impl,
            "--abi", f"{impl}{major}{minor}", "--abi", "abi3", "--abi", "none"]
    machine = facts["machine"]
    libc = facts.get("libc", "")
    plats: list[str] = []
    if facts.get("platform") == "linux":
        m = re.match(r"glibc (\d+)\.(\d+)", libc)
        if m:
            top = int(m.group(2))
            plats += [f"manylinux_{m.group(1)}_{v}_{machine}" for v in range(top, 4, -1)]
            plats += [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]
        else:  # musl or unknown: musllinux tags
            plats += [f"musllinux_1_{v}_{machine}" for v in range(2, -1, -1)]
        plats.append(f"linux_{machine}")
    elif facts.get("platform") == "darwin":
        plats += [f"macosx_{v}_0_{machine}" for v in range(15, 10, -1)]
    for p in plats:
        args += ["--platform", p]
    return args


def _pip_command() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    uv = local_uv()
    if uv is None:
        raise OfflineError("neither pip nor uv on the controller to download wheels")
    return [uv, "tool", "run", "pip"]


class WheelDownloads:
    """Wheels downloaded on the controller, once per (platform, requirement set) per call."""

    def __init__(self):
        self.tasks: dict[tuple, asyncio.Task] = {}
        self.dirs: list[tempfile.TemporaryDirectory] = []

    def get(self, facts: dict, spec: EnvSpec) -> "asyncio.Task[list[Path]]":
        args = platform_args(facts)
        text = "".join(f"{line}\n" for line in spec.opts + spec.reqs)
        key = (text, *args)
        if key not in self.tasks:
            self.tasks[key] = asyncio.ensure_future(self._download(args, text))
        return self.tasks[key]

    async def _download(self, args: list[str], text: str) -> list[Path]:
        tmp = tempfile.TemporaryDirectory(prefix="sshjobs-wheels-")
        self.dirs.append(tmp)
        dest = Path(tmp.name) / "wheels"
        reqfile = Path(tmp.name) / "requirements.txt"
        reqfile.write_text(text)
        cmd = [*_pip_command(), "download", "--disable-pip-version-check", "--quiet", "--only-binary=:all:",
               "--dest", str(dest), *args, "-r", str(reqfile)]
        log.info("downloading wheels for offline hosts", command=" ".join(map(shlex.quote, cmd)))
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            text = out.decode("utf-8", "replace").strip()
            raise OfflineError("downloading wheels on the controller failed:\n"
                               + provision._trim(text))
        return sorted(dest.glob("*.whl"))

    def cleanup(self) -> None:
        for d in self.dirs:
            d.cleanup()


# -- install on one host ---------------------------------------------------------------------
async def install_host(state: HostState, spec: EnvSpec, *, offline: bool, uv: str | None,
                       downloads: WheelDownloads) -> Result:
    """Make the environment exist on one host and run its workers in it; a Result whose
    value describes it."""
    t0 = time.perf_counter()
    name = state.name
    if not state.usable:
        return state.failure(state.index)
    reqs, opts = spec.reqs, spec.opts
    alias = spec.alias(state.host.python, dict(state.host.env))
    state.events.installing(name, reqs, offline)
    request = {"op": "check", "workdir": state.host.workdir, "requirements": reqs, "options": opts,
               "offline": offline, "alias": alias}
    try:
        reply = await quick_check(state, reqs, opts, alias) or await remote_call(state, request)
        how = "cached"
        if not reply["cached"]:
            how, reply = await _build(state, spec, request, reply, offline, uv, downloads)
    except HostError as exc:
        log.warning("install failed", host=name, error=exc.kind, detail=exc.message[-500:])
        state.events.install_failed(name, exc.kind, exc.message)
        return failed(exc, name, job=state.index, duration=time.perf_counter() - t0)
    value = {"env": reply["env"], "python": reply["python"], "hash": reply["hash"], "cached": reply["cached"],
             "uv": None if reply["cached"] else how, "version": reply["version"], "requirements": reqs}
    log.info("environment ready", host=name, hash=value["hash"], cached=value["cached"], uv=value["uv"])
    state.alias = alias
    await state.use_env(value["python"], alias)
    state.env_prefix = value["env"]
    state.events.installed(name, value)
    return Result(name, True, value, duration=time.perf_counter() - t0, job=state.index)


async def _build(state: HostState, spec: EnvSpec, request, reply, offline, uv, downloads) -> tuple[str, dict]:
    facts, workdir = reply["facts"], reply["workdir"]
    methods = list(UV_METHODS) if uv in (None, "auto") else [uv]
    for m in methods:
        if m not in UV_METHODS:
            raise InstallError(f"unknown uv method {m!r}: use one of {', '.join(UV_METHODS)}")
    uploaded = False
    host_uv = reply.get("uv")  # "path" or "workdir" if the host has one
    if not (host_uv and host_uv in methods) and "upload" in methods:
        if can_upload_uv(facts):
            state.events.uploading_uv(state.name, local_uv())
            await upload_uv(state, workdir)
            uploaded = True
            log.info("uploaded uv to the host", host=state.name)
        else:
            log.info("cannot upload uv: another OS, architecture or libc", host=state.name,
                     host_platform=f"{facts.get('platform')} {facts.get('machine')} {facts.get('libc')}")
    if offline:
        wheels = await downloads.get(facts, spec)
        have = reply.get("wheels", {})
        todo = [(p, f"{workdir}/wheels/{p.name}") for p in wheels if have.get(p.name) != p.stat().st_size]
        state.events.uploading_wheels(state.name, len(todo), len(wheels) - len(todo))
        sent = await sftp_upload(state, todo)
        log.info("shipped wheels", host=state.name, uploaded=len(todo), skipped=len(wheels) - len(todo), bytes=sent)
    host_methods = [m for m in methods if m != "upload"]
    if uploaded:  # use it; should it not run there after all, pip is next
        host_methods = ["workdir"] + [m for m in methods if m in ("pip", "venv-pip")]
    built = await remote_call(state, dict(request, op="build", uv_methods=host_methods))
    if built.get("uv") == "venv-pip":
        log.warning("no uv on the host: built the environment with python -m venv and pip (slower)",
                    host=state.name)
    elif built.get("uv"):
        log.info("built the environment", host=state.name, uv="uploaded" if uploaded else built["uv"])
    how = built.get("uv")
    return ("uploaded" if uploaded and how == "workdir" else how), built


def want(states: Sequence[HostState], specs: Sequence[EnvSpec | None]) -> None:
    """Name each host's wanted environment before its workers start, so that the first one
    starts straight in it when it exists (one shell test, no second interpreter)."""
    for state, spec in zip(states, specs):
        if spec is not None and state.env_key is None:
            state.alias = spec.alias(state.host.python, dict(state.host.env))


def _present(state: HostState, spec: EnvSpec) -> Result:
    """The Result of an install whose environment the workers already run in: no round trip
    (the first worker reported where it runs)."""
    prefix = state.env_prefix or os.path.dirname(os.path.dirname(state.python))
    value = {"env": prefix, "python": f"{prefix}/bin/python", "hash": os.path.basename(prefix), "cached": True,
             "uv": None, "version": ".".join(map(str, state.hello.get("python") or ())), "requirements": spec.reqs}
    state.events.installing(state.name, spec.reqs, False)
    state.events.installed(state.name, value)
    return Result(state.name, True, value, job=state.index)


async def provide(state: HostState, spec: EnvSpec, ready: Callable[[HostState], Awaitable[bool]], *,
                  offline: bool, uv: str | None, downloads: WheelDownloads) -> Result:
    """One host's workers run in ``spec``'s environment, installed first when it is missing:
    the install's Result.  ``ready(state)`` connects the host and starts its first worker,
    which tries the environment's alias."""
    want([state], [spec])
    if not await ready(state):
        return state.failure(state.index)
    alias = spec.alias(state.host.python, dict(state.host.env))
    async with state.env_lock:
        if state.env_key == alias:
            return _present(state, spec)
        return await install_host(state, spec, offline=offline, uv=uv, downloads=downloads)


async def ensure_env(state: HostState, spec: EnvSpec, ready: Callable[[HostState], Awaitable[bool]], *,
                     offline: bool, downloads: WheelDownloads) -> Result | None:
    """Before a call's jobs on one host (``provide``): None when its workers run in the
    environment (no round trip when they already did), else the failed install's Result."""
    alias = spec.alias(state.host.python, dict(state.host.env))
    if state.env_key == alias:
        return None
    want([state], [spec])
    if not await ready(state):
        return state.failure(state.index)
    async with state.env_lock:
        if state.env_key == alias:
            return None  # the first worker started in it
        result = await install_host(state, spec, offline=offline, uv=None, downloads=downloads)
    return None if result.ok else result


async def install(states: Sequence[HostState], specs: Sequence[EnvSpec], ready: Callable[[HostState], Awaitable[bool]],
                  *, offline: bool | None = None, uv: str | None = None) -> list[Result]:
    """``provide`` on every host, ``specs[i]`` on ``states[i]``; one Result per host."""
    want(states, specs)
    downloads = WheelDownloads()
    try:
        results = await asyncio.gather(*(
            provide(s, spec, ready, offline=s.host.offline if offline is None else offline, uv=uv, downloads=downloads)
            for s, spec in zip(states, specs)))
    finally:
        downloads.cleanup()
    return list(results)


# -- python = "match" --------------------------------------------------------------------------
async def match_python(state: HostState) -> str:
    """A host interpreter of the controller's Python minor version, found by uv on the host."""
    version = "%d.%d" % sys.version_info[:2]
    request = {"op": "find-python", "workdir": state.host.workdir, "version": version,
               "uv_methods": ["path", "workdir"]}
    try:
        reply = await remote_call(state, request, python="python3")
        if reply.get("uv") is None:
            if can_upload_uv(reply["facts"]):
                await upload_uv(state, reply["workdir"])
            elif not state.host.offline:
                request["uv_methods"] = ["pip"]
            reply = await remote_call(state, request, python="python3")
    except HostError as exc:
        raise PythonMismatch(
            f"{exc.message}\n{state.host.target}: python = \"match\" found no Python {version} on the host;"
            f" install one (uv python install {version}) or set python = \"python{version}\" for this host."
        ) from None
    if not reply.get("python"):
        raise PythonMismatch(f"{state.host.target}: python = \"match\" needs uv on the host,"
                             " and none could be found, uploaded or installed with pip")
    log.info("matched the controller's Python", host=state.name, python=reply["python"], uv=reply.get("uv"))
    return reply["python"]


# -- housekeeping ------------------------------------------------------------------------------
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(value: str | float | int) -> float:
    """Seconds from ``7d``, ``12h``, ``30m``, ``90s``, ``2w`` or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", value)
    if not m:
        raise ConfigError(f"not an age: {value!r} (use e.g. 7d, 12h, 30m)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


async def _each(states: list[HostState], request: dict, key: str) -> list[Result]:
    async def one(state):
        if not state.usable:
            return state.failure(state.index)
        try:
            reply = await remote_call(state, dict(request, workdir=state.host.workdir))
        except HostError as exc:
            return failed(exc, state.name, job=state.index)
        return Result(state.name, True, reply[key] if key else reply, job=state.index)

    return list(await asyncio.gather(*(one(s) for s in states)))


async def list_envs(states: list[HostState]) -> list[Result]:
    """The environments on every host: each Result's value is a list of dicts (hash, env,
    requirements, python, created, last_used, complete)."""
    return await _each(states, {"op": "list"}, "envs")


async def prune_envs(states: list[HostState], older_than: str | float = "7d") -> list[Result]:
    """Remove environments not used for ``older_than`` (e.g. "7d"), and interrupted builds;
    an environment being built or checked at that moment is kept.  Each Result's value is
    ``{"removed": [...], "kept": [...]}``."""
    return await _each(states, {"op": "prune", "older_than": parse_age(older_than)}, "")
