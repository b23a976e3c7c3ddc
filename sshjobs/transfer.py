"""Files to and from every host, over SFTP on the Cluster's own connections: ``put`` (a
file or a folder into a folder of each host), ``get`` (a host's file or folder into a local
folder named after the host) and ``sync`` (a folder's files whose content differs from the
host's copy, by sha256: the host's side, ``remote/tree.py``, says which, and with
``delete`` removes what is gone locally).  All hosts at once; one Result per host, in
inventory order, whose value counts what was copied.

A relative remote path is under the host's home (where SFTP and exec channels start);
``~`` and ``~/...`` mean the same.  A file arrives under a temporary name in its folder and
is renamed into place, so a reader never sees half a file and a copy cut short (a full
disk, a lost connection) leaves none behind; the mode and times go with it (``scp -p``).
Symbolic links to files are copied as files; links to folders are skipped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import posixpath
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import asyncssh

from .errors import ConfigError, HostError, HostLost, TransferError
from .hosts import HostState
from .log import get_logger
from .remote import TREE
from .result import Result, failed
from .worker import stub_command

log = get_logger("sshjobs.transfer")

FILES_IN_FLIGHT = 16  # files copied at once per host: each small file is ~5 SFTP round trips
PROGRESS_EVERY = 0.25  # seconds between two ``transferring`` events of one host
PART = ".sshjobs-part"  # the ending of a file still being copied

Ready = Callable[[HostState], Awaitable[bool]]


async def sftp_replace(sftp, tmp: str, dest: str) -> None:
    """Rename ``tmp`` over ``dest`` at once (OpenSSH's posix-rename), else remove and rename."""
    try:
        await sftp.posix_rename(tmp, dest)
    except asyncssh.SFTPOpUnsupported:  # not OpenSSH: a plain rename fails on an existing file
        if await sftp.exists(dest):
            await sftp.remove(dest)
        await sftp.rename(tmp, dest)


# -- the controller's side ------------------------------------------------------------------
@dataclass(frozen=True)
class LocalFile:
    """A file to send: its path relative to the copy's root (POSIX), on the controller, its
    size and what its ``os.stat`` says changed it (the digest cache's key)."""

    rel: str
    path: str
    size: int
    stamp: tuple = field(repr=False, default=())


@dataclass
class LocalTree:
    """What ``put`` or ``sync`` sends: files and folders, relative to the copy's root."""

    files: list[LocalFile]
    dirs: list[str]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def local_path(path: str | os.PathLike, what: str = "local path") -> Path:
    """A controller path that must exist: a ConfigError (nothing contacted) if it does not."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), not {type(path).__name__} {path!r}")
    if not os.fspath(path):
        raise ConfigError(f"{what} is empty")
    # absolute and normalised ("." has a name: the folder's), links kept as named
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not p.exists():
        raise ConfigError(f"{path}: no such file or folder on the controller")
    return p


def remote_path(path: str | os.PathLike, what: str = "remote path") -> str:
    """A host path as SFTP reads it: relative ones (and ``~/...``) under the home directory."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), not {type(path).__name__} {path!r}")
    text = os.fspath(path)
    if not text:
        raise ConfigError(f"{what} is empty: give a path (a relative one is under the host's home, '~' is the home)")
    if text == "~":
        return "."
    if text.startswith("~/"):
        text = text[2:].lstrip("/") or "."
    return text.rstrip("/") or "/"


def scan(path: Path, top: str | None = None) -> LocalTree:
    """The files and folders of ``path`` (a folder, or a single file); with ``top``, put
    under a folder of that name (a put of a folder: it arrives as ``REMOTE_DIR/top``)."""
    if not path.is_dir():
        st = path.stat()
        return LocalTree([LocalFile(path.name, str(path), st.st_size, _stamp(st))], [])
    files: list[LocalFile] = []
    dirs: list[str] = [top] if top else []
    base = str(path)
    for folder, subdirs, names in os.walk(base):
        rel = os.path.relpath(folder, base)
        prefix = (top + "/" if top else "") + ("" if rel == "." else rel.replace(os.sep, "/") + "/")
        kept = []
        for name in sorted(subdirs):
            if os.path.islink(os.path.join(folder, name)):
                log.info("a link to a folder is skipped", path=os.path.join(folder, name))
            else:
                kept.append(name)
                dirs.append(prefix + name)
        subdirs[:] = kept
        for name in sorted(names):
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
            except OSError:
                log.info("a broken link is skipped", path=full)
                continue
            if stat.S_ISREG(st.st_mode):
                files.append(LocalFile(prefix + name, full, st.st_size, _stamp(st)))
    return LocalTree(files, dirs)


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# A file's digest while its stat is the same: a re-sync of an unchanged folder reads none
# of its files on the controller.
_DIGESTS: dict[str, tuple[tuple, str]] = {}


def digest(f: LocalFile) -> str:
    hit = _DIGESTS.get(f.path)
    if hit is not None and hit[0] == f.stamp:
        return hit[1]
    h = hashlib.sha256()
    with open(f.path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    value = h.hexdigest()
    if len(_DIGESTS) > 100_000:
        _DIGESTS.clear()
    _DIGESTS[f.path] = (f.stamp, value)
    return value


# -- errors, translated in one place ----------------------------------------------------------
def _reason(exc: BaseException) -> str:
    if isinstance(exc, (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath)):
        return "no such file or folder"
    if isinstance(exc, (asyncssh.SFTPPermissionDenied, asyncssh.SFTPWriteProtect)):
        return "permission denied"
    if isinstance(exc, (asyncssh.SFTPNoSpaceOnFilesystem, asyncssh.SFTPQuotaExceeded)):
        return "no space left on the host's disk"
    if isinstance(exc, asyncssh.SFTPError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"{type(exc).__name__}: {exc}"


def _lost(exc: BaseException) -> bool:
    return isinstance(exc, (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection, asyncssh.ConnectionLost,
                            asyncssh.DisconnectError, asyncssh.ChannelOpenError, BrokenPipeError,
                            ConnectionResetError))


def host_error(state: HostState, exc: BaseException, what: str) -> HostError:
    """The HostError of an SFTP or OS error met while doing ``what`` (it names the path)."""
    if isinstance(exc, HostError):
        return exc
    if _lost(exc):
        return HostLost(f"{state.host.target}: connection lost while {what}: {_reason(exc)}")
    return TransferError(f"{state.host.target}: {what}: {_reason(exc)}")


# -- one host's copy ------------------------------------------------------------------------
class _Copy:
    """One host's part of a put, get or sync: its SFTP session, what has been copied so far
    and the ``transferring`` events that say so."""

    def __init__(self, state: HostState, op: str, sftp: asyncssh.SFTPClient, files: int, size: int):
        self.state = state
        self.op = op
        self.sftp = sftp
        self.files = files
        self.size = size
        self.done_files = 0
        self.done_bytes = 0
        self.partial: dict[str, int] = {}
        self.last = 0.0
        self.report(force=True)

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.state.events.transferring(self.state.name, self.op, self.files, self.size, self.done_files,
                                           self.done_bytes + sum(self.partial.values()))

    def _progress(self, key: str) -> Callable:
        def on(_src, _dst, copied: int, _total: int) -> None:
            self.partial[key] = copied
            self.report()

        return on

    def _done(self, key: str, size: int) -> None:
        self.partial.pop(key, None)
        self.done_files += 1
        self.done_bytes += size

    async def each(self, items: Sequence, copy: Callable[[Any], Awaitable[None]]) -> None:
        """``copy(item)`` for every item, ``FILES_IN_FLIGHT`` at once; the first error stops the others."""
        if not items:
            return
        sem = asyncio.Semaphore(FILES_IN_FLIGHT)

        async def one(item) -> None:
            async with sem:
                await copy(item)

        tasks = [asyncio.ensure_future(one(item)) for item in items]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
            raise

    # -- to the host --
    async def mkdirs(self, folders: Sequence[str]) -> None:
        """Create remote folders (each one's parent exists or is listed before it), a level at a time."""
        levels: dict[int, list[str]] = {}
        for path in folders:
            levels.setdefault(path.rstrip("/").count("/"), []).append(path)
        for depth in sorted(levels):
            await asyncio.gather(*(self._mkdir(p) for p in levels[depth]))

    async def _mkdir(self, path: str) -> None:
        try:
            await self.sftp.mkdir(path)
        except (asyncssh.SFTPFailure, asyncssh.SFTPFileAlreadyExists) as exc:
            try:
                if await self.sftp.isdir(path):
                    return
            except (asyncssh.Error, OSError):
                pass
            raise await self.write_error(exc, path, f"creating the folder {path}", 0) from None
        except (asyncssh.Error, OSError) as exc:
            raise host_error(self.state, exc, f"creating the folder {path}") from None

    async def makedirs(self, path: str) -> None:
        try:
            await self.sftp.makedirs(path, exist_ok=True)
        except (asyncssh.Error, OSError) as exc:
            raise host_error(self.state, exc, f"creating the folder {path}") from None

    async def upload(self, f: LocalFile, dest: str) -> None:
        """One file to ``dest``, by way of a temporary name beside it."""
        folder, name = posixpath.split(dest)
        tmp = posixpath.join(folder, f".{name}.{secrets.token_hex(4)}{PART}")
        sftp = self.sftp
        try:
            await sftp.put(f.path, tmp, preserve=True, progress_handler=self._progress(dest))
            await sftp_replace(sftp, tmp, dest)
        except (asyncssh.Error, OSError) as exc:
            if isinstance(exc, OSError) and not _lost(exc) and not isinstance(exc, asyncssh.Error):
                error: HostError = TransferError(f"{self.state.host.target}: reading {f.path} on the controller:"
                                                 f" {_reason(exc)}")
            else:
                error = await self.write_error(exc, dest, f"writing {dest}", f.size)
            await self._forget(tmp)
            raise error from None
        except BaseException:
            await asyncio.shield(self._forget(tmp))
            raise
        self._done(dest, f.size)

    async def _forget(self, tmp: str) -> None:
        try:
            await self.sftp.remove(tmp)
        except (asyncssh.Error, OSError):
            pass

    async def write_error(self, exc: BaseException, path: str, what: str, size: int) -> HostError:
        """OpenSSH's SFTP server says only "Failure" for a full disk: the free space of
        the folder tells whether that was it."""
        if isinstance(exc, asyncssh.SFTPFailure) and not _lost(exc):
            try:
                vfs = await self.sftp.statvfs(posixpath.dirname(path) or ".")
                free = vfs.bavail * (vfs.frsize or vfs.bsize)
            except (asyncssh.Error, OSError):
                free = None
            if free is not None and (free < max(size, 1) or vfs.favail == 0):
                return TransferError(f"{self.state.host.target}: {what}: no space left on the host's disk"
                                     f" ({free} bytes free, the file has {size})")
        return host_error(self.state, exc, what)

    # -- from the host --
    async def walk(self, top: str, rel: str, files: list, dirs: list) -> None:
        """A remote folder's files (remote path, relative local path, size) and folders, links
        to files as files; links to folders are skipped."""
        subdirs = []
        try:
            async for entry in self.sftp.scandir(top):
                name = entry.filename
                if name in (".", ".."):
                    continue
                path, sub = posixpath.join(top, name), f"{rel}/{name}"
                attrs = entry.attrs
                if attrs.type == asyncssh.FILEXFER_TYPE_SYMLINK or (attrs.permissions is not None
                                                                   and stat.S_ISLNK(attrs.permissions)):
                    try:
                        attrs = await self.sftp.stat(path)
                    except asyncssh.SFTPError:
                        continue  # a broken link
                    if _is_dir(attrs):
                        continue
                if _is_dir(attrs):
                    dirs.append(sub)
                    subdirs.append((path, sub))
                elif _is_file(attrs):
                    files.append((path, sub, attrs.size or 0))
        except (asyncssh.Error, OSError) as exc:
            raise host_error(self.state, exc, f"reading the folder {top}") from None
        await asyncio.gather(*(self.walk(path, sub, files, dirs) for path, sub in subdirs))

    async def download(self, item: tuple[str, Path, int]) -> None:
        src, dest, size = item
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}{PART}")
        try:
            await self.sftp.get(src, str(tmp), preserve=True, progress_handler=self._progress(src))
            os.replace(tmp, dest)
        except (asyncssh.Error, OSError) as exc:
            _unlink(tmp)
            if isinstance(exc, OSError) and not isinstance(exc, asyncssh.Error) and not _lost(exc):
                raise TransferError(f"{self.state.host.target}: writing {dest} on the controller:"
                                    f" {_reason(exc)}") from None
            raise host_error(self.state, exc, f"reading {src}") from None
        except BaseException:
            _unlink(tmp)
            raise
        self._done(src, size)


def _is_dir(attrs: asyncssh.SFTPAttrs) -> bool:
    if attrs.permissions is not None:
        return stat.S_ISDIR(attrs.permissions)
    return attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY


def _is_file(attrs: asyncssh.SFTPAttrs) -> bool:
    if attrs.permissions is not None:
        return stat.S_ISREG(attrs.permissions)
    return attrs.type == asyncssh.FILEXFER_TYPE_REGULAR


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _Session:
    """``async with _Session(state, op, files, size) as copy:`` an SFTP session on one of the
    host's connections (it counts against MaxSessions) for one copy."""

    def __init__(self, state: HostState, op: str, files: int = 0, size: int = 0):
        self.state, self.op, self.files, self.size = state, op, files, size
        self._release: Callable[[], None] | None = None
        self._client: Any = None

    async def __aenter__(self) -> _Copy:
        link = self.state.link
        if link is None:
            raise self.state.failure(self.state.index).error
        try:
            conn, self._release = await link.acquire()
            self._client = conn.start_sftp_client()
            sftp = await self._client.__aenter__()
        except (asyncssh.Error, OSError) as exc:
            self._free()
            raise host_error(self.state, exc, "starting SFTP") from None
        except BaseException:
            self._free()
            raise
        return _Copy(self.state, self.op, sftp, self.files, self.size)

    async def __aexit__(self, *exc) -> None:
        try:
            if self._client is not None:
                await self._client.__aexit__(*exc)
        except (asyncssh.Error, OSError):
            pass
        finally:
            self._free()

    def _free(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


# -- every host -------------------------------------------------------------------------------
async def _every_host(states: Sequence[HostState], ready: Ready, op: str,
                      work: Callable[[HostState], Awaitable[dict]]) -> list[Result]:
    async def one(state: HostState) -> Result:
        if not await ready(state):
            return state.failure(state.index)
        t0 = time.perf_counter()
        try:
            value = await work(state)
        except (HostError, asyncssh.Error, OSError) as exc:
            error = host_error(state, exc, op)
            log.info("transfer failed", host=state.name, op=op, error=error.kind, detail=error.message)
            state.events.transfer_failed(state.name, op, error.kind, error.message)
            return failed(error, state.name, job=state.index, duration=time.perf_counter() - t0)
        state.events.transferred(state.name, op, value)
        return Result(state.name, True, value, duration=time.perf_counter() - t0, job=state.index)

    return list(await asyncio.gather(*(one(s) for s in states)))


async def put(states: Sequence[HostState], ready: Ready, source: Path, remote_dir: str) -> list[Result]:
    """``source`` (a file, or a folder and everything under it) into ``remote_dir`` on every
    host, created if missing; each Result's value: ``files``, ``bytes``, ``remote`` (where
    it arrived, absolute)."""
    tree = scan(source, top=source.name if source.is_dir() else None)
    size = tree.size

    async def work(state: HostState) -> dict:
        async with _Session(state, "put", len(tree.files), size) as copy:
            await copy.makedirs(remote_dir)
            await copy.mkdirs([posixpath.join(remote_dir, d) for d in tree.dirs])
            await copy.each(tree.files, lambda f: copy.upload(f, posixpath.join(remote_dir, f.rel)))
            where = await _realpath(copy, posixpath.join(remote_dir, source.name))
        return {"files": len(tree.files), "bytes": size, "remote": where}

    return await _every_host(states, ready, "put", work)


async def _realpath(copy: _Copy, path: str) -> str:
    try:
        return await copy.sftp.realpath(path)
    except (asyncssh.Error, OSError):
        return path


def host_folder(local_dir: Path, host: str) -> Path:
    """Where ``get`` puts a host's files: ``local_dir/<host name>`` (a name cannot climb out)."""
    name = host.replace(os.sep, "_").replace("/", "_")
    return local_dir / (name if name not in ("", ".", "..") else f"_{name}")


async def get(states: Sequence[HostState], ready: Ready, source: str, local_dir: Path) -> list[Result]:
    """``source`` (a host's file or folder) from every host into ``local_dir/<host name>/``,
    created if missing; each Result's value: ``files``, ``bytes``, ``local`` (the copy's path)."""

    async def work(state: HostState) -> dict:
        async with _Session(state, "get") as copy:
            sftp = copy.sftp
            try:
                attrs = await sftp.stat(source)
                name = posixpath.basename(source.rstrip("/"))
                if name in ("", ".", ".."):
                    name = posixpath.basename(await sftp.realpath(source)) or "root"
            except (asyncssh.Error, OSError) as exc:
                raise host_error(state, exc, source) from None
            folder = host_folder(local_dir, state.name)
            top = folder / name
            files: list[tuple[str, str, int]] = []
            dirs: list[str] = []
            if _is_dir(attrs):
                await copy.walk(source, name, files, dirs)
                dirs.insert(0, name)
            elif _is_file(attrs):
                files.append((source, name, attrs.size or 0))
            else:
                raise TransferError(f"{state.host.target}: {source}: neither a file nor a folder")
            try:
                for d in dirs:
                    (folder / d).mkdir(parents=True, exist_ok=True)
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TransferError(f"{state.host.target}: creating {exc.filename or folder} on the controller:"
                                    f" {_reason(exc)}") from None
            size = sum(s for _, _, s in files)
            copy.files, copy.size = len(files), size
            copy.report(force=True)
            await copy.each([(src, folder / rel, s) for src, rel, s in files], copy.download)
        return {"files": len(files), "bytes": size, "local": str(top)}

    return await _every_host(states, ready, "get", work)


async def sync(states: Sequence[HostState], ready: Ready, tree: LocalTree, remote_dir: str,
               delete: bool = False) -> list[Result]:
    """Make ``remote_dir`` on every host hold ``tree``'s files (a local folder's): only those
    whose content differs from the host's copy are sent; ``delete`` also removes the files
    and folders the local folder does not have.  Each Result's value: ``files`` and
    ``bytes`` sent, ``unchanged`` (files already the same), ``deleted`` (files and folders
    removed), ``remote`` (absolute)."""
    manifest = await _manifest(tree)
    request = json.dumps({"root": remote_dir, "files": manifest, "dirs": tree.dirs, "delete": delete}).encode()
    by_rel = {f.rel: f for f in tree.files}

    async def work(state: HostState) -> dict:
        reply = await tree_call(state, request)
        root = reply["root"]
        send = [by_rel[rel] for rel in reply["send"] if rel in by_rel]
        size = sum(f.size for f in send)
        if send:
            async with _Session(state, "sync", len(send), size) as copy:
                await copy.each(send, lambda f: copy.upload(f, posixpath.join(root, f.rel)))
        else:
            state.events.transferring(state.name, "sync", 0, 0, 0, 0)
        return {"files": len(send), "bytes": size, "unchanged": reply["unchanged"],
                "deleted": len(reply["deleted"]), "remote": root}

    return await _every_host(states, ready, "sync", work)


async def _manifest(tree: LocalTree) -> dict[str, list]:
    """{relative path: [size, sha256]} of the files to sync.  Files not hashed before are read
    in a thread of their own while the hosts connect: not in the loop's default executor,
    which the connects use (``api.use_lean_executor`` leaves it one thread)."""

    def build() -> dict[str, list]:
        return {f.rel: [f.size, digest(f)] for f in tree.files}

    if all((hit := _DIGESTS.get(f.path)) is not None and hit[0] == f.stamp for f in tree.files):
        return build()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sshjobs-digest")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, build)
    finally:
        pool.shutdown(wait=False)


async def tree_call(state: HostState, request: bytes) -> dict:
    """Run ``remote/tree.py`` on a host with a sync's request: its reply, or the HostError."""
    link = state.link
    if link is None:
        raise state.failure(state.index).error
    python = state.base_python
    cmd, _ = stub_command(python, dict(state.host.env) | dict(state.env))  # none of env is needed past the start
    reply, proc = await link.run_json(cmd, TREE.start(state.host.workdir) + request)
    if reply is None:
        out = proc.stdout.decode("utf-8", "replace").strip()
        err = (proc.stderr or b"").decode("utf-8", "replace").strip()
        raise TransferError(f"{state.host.target}: {python} exited with status {proc.exit_status}:"
                            f" {(err or out)[-1000:]}") from None
    if not reply.get("ok"):
        raise TransferError(f"{state.host.target}: {reply.get('error')}")
    return reply

