"""``import asyncssh`` without the subprocesses of its liboqs probe.

asyncssh's ``crypto/pq.py`` looks for the optional liboqs (post-quantum sntrup761) with
``ctypes.util.find_library('oqs')``, then ``('liboqs')``.  On Linux each lookup that
finds nothing runs ``ldconfig -p``, then ``gcc`` (and ``ld``): tens of ms of every command
that imports asyncssh, spent learning that liboqs is absent.  While that one module runs
(and only then), those two lookups first look, without a subprocess, where those tools
look: the ld.so cache that ``ldconfig -p`` prints, ``LD_LIBRARY_PATH``, ``LIBRARY_PATH``
and the standard library folders.  No ``lib<name>.`` file there: the answer is None, as
find_library's would be.  One there: find_library itself answers, so an installed liboqs
is found and used exactly as before.

Installed by ``sshjobs/__init__.py`` (which runs before any module that imports
asyncssh) as a finder on ``sys.meta_path`` that acts on ``asyncssh.crypto.pq`` alone and
then leaves.  Imports nothing of sshjobs; costs nothing until asyncssh is imported.
"""

from __future__ import annotations

import os
import sys

MODULE = "asyncssh.crypto.pq"
NAMES = ("oqs", "liboqs")
LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/local/lib64")


def may_exist(name: str) -> bool:
    """Whether a ``lib<name>.`` shared library could be where find_library looks (False
    only when it certainly is not: no ld.so cache entry, no such file in those folders)."""
    stem = f"lib{name}."
    try:
        with open("/etc/ld.so.cache", "rb") as f:
            if stem.encode() in f.read():
                return True
    except OSError:
        pass
    machine = os.uname().machine
    dirs = [*LIB_DIRS, f"/lib/{machine}-linux-gnu", f"/usr/lib/{machine}-linux-gnu",
            *(d for var in ("LD_LIBRARY_PATH", "LIBRARY_PATH") for d in os.environ.get(var, "").split(":") if d)]
    for folder in dirs:
        try:
            if any(entry.startswith(stem) for entry in os.listdir(folder)):
                return True
        except OSError:
            continue
    return False


class _Loader:
    """The real loader of asyncssh.crypto.pq, with the quick lookup in place while it runs."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        import ctypes.util

        real = ctypes.util.find_library

        def find_library(name):
            if name in NAMES and not may_exist(name):
                return None
            return real(name)

        ctypes.util.find_library = find_library
        try:
            self.loader.exec_module(module)
        finally:
            if ctypes.util.find_library is find_library:
                ctypes.util.find_library = real


class Finder:
    """On sys.meta_path until asyncssh.crypto.pq is imported; None for every other name."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != MODULE:
            return None
        uninstall()
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path, target)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Put the finder in place (Linux only: elsewhere find_library spawns nothing)."""
    if sys.platform.startswith("linux") and MODULE not in sys.modules and Finder not in sys.meta_path:
        sys.meta_path.insert(0, Finder)


def uninstall() -> None:
    if Finder in sys.meta_path:
        sys.meta_path.remove(Finder)
