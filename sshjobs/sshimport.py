"""``import asyncssh`` at less cost: no subprocess for its liboqs probe, no regular
expressions compiled that an SSH client never uses, and, in sshjobs' own commands, no
cyclic collections while it loads.

asyncssh's ``crypto/pq.py`` looks for the optional liboqs (post-quantum sntrup761) with
``ctypes.util.find_library('oqs')``, then ``('liboqs')``.  On Linux each lookup that
finds nothing runs ``ldconfig -p``, then ``gcc`` (and ``ld``): tens of ms of every command
that imports asyncssh, spent learning that liboqs is absent.  While that one module runs
(and only then), those two lookups first look, without a subprocess, where those tools
look: the ld.so cache that ``ldconfig -p`` prints, ``LD_LIBRARY_PATH``, ``LIBRARY_PATH``
and the standard library folders.  No ``lib<name>.`` file there: the answer is None, as
find_library's would be.  One there: find_library itself answers, so an installed liboqs
is found and used exactly as before.

``cryptography.x509.name`` (imported by asyncssh) compiles the expressions of its RFC 4514
name parser as it loads (~12 ms of CPU); while it loads, the expressions it compiles
itself are compiled on first use instead.  ``own_process()`` (the CLI) pauses the cyclic
GC during the import of sshjobs' SSH layers and freezes what they made.

Installed by ``sshjobs/__init__.py`` (which runs before any module that imports
asyncssh) as a finder on ``sys.meta_path`` that acts on the modules in ``ACTS`` alone and
leaves when asyncssh is loaded.  Imports nothing of sshjobs; costs nothing until asyncssh
is imported.
"""

from __future__ import annotations

import gc
import os
import sys

# module -> what is changed while it loads (_Loader)
ACTS = {"sshjobs.cluster": "pause", "asyncssh": "pause", "asyncssh.crypto.pq": "liboqs",
        "cryptography.x509.name": "lazy-re"}
_LINUX = sys.platform.startswith("linux")
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


class _LazyPattern:
    """A regular expression compiled when first used (its methods, its attributes)."""

    def __init__(self, compile, pattern, flags):
        self._args = (compile, pattern, flags)
        self._compiled = None

    def __getattr__(self, name):
        if self._compiled is None:
            compile, pattern, flags = self._args
            self._compiled = compile(pattern, flags)
        return getattr(self._compiled, name)


class _Loader:
    """A module's real loader, run with this module's change for it in place (``how``):
    "pause" the cyclic GC (when ``own_process``), "liboqs" the quick lookup, "lazy-re"
    regular expressions compiled on first use."""

    def __init__(self, loader, how: str):
        self.loader = loader
        self.how = how

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        try:
            getattr(self, "_" + self.how.replace("-", "_"))(module)
        finally:
            if module.__name__ == "asyncssh":
                uninstall()  # its import is over, and with it every one this finder acts on

    def _pause(self, module):
        if not _freeze:
            self.loader.exec_module(module)
            return
        # asyncssh and cryptography make ~100,000 objects that all outlive the import: the
        # ~80 collections they trigger find no garbage among them (~10 ms of a command's
        # ~200 ms import), and a later one would scan them all again.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self.loader.exec_module(module)
        finally:
            gc.freeze()
            if enabled:
                gc.enable()

    def _liboqs(self, module):
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

    def _lazy_re(self, module):
        # cryptography.x509.name compiles its RFC 4514 parser's expressions as it loads,
        # one of them over every Unicode code point above 0x80: ~12 ms of CPU, for parsing
        # names from strings, which an SSH client never does.
        import re

        real = re.compile

        def lazy(pattern, flags=0):
            if sys._getframe(1).f_globals.get("__name__") != module.__name__:
                return real(pattern, flags)  # another module's, imported meanwhile
            return _LazyPattern(real, pattern, flags)

        re.compile = lazy
        try:
            self.loader.exec_module(module)
        finally:
            if re.compile is lazy:
                re.compile = real


class Finder:
    """On sys.meta_path until asyncssh is imported; None for every name but those it acts
    on (``ACTS``).  The spec is the one the other finders give, its loader wrapped."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        how = ACTS.get(name)
        if how is None or (how == "liboqs" and not _LINUX):
            return None
        for finder in sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, how)
                return spec
        return None


_freeze = False


def own_process() -> None:
    """This process is an sshjobs command: the imports of the SSH layers run with the
    cyclic GC paused and then freeze what the process holds (``gc.freeze``), which no
    collection need scan again.  Not for a library's caller, whose objects would be frozen
    too."""
    global _freeze
    _freeze = True


def install() -> None:
    """Put the finder in place, before anything imports asyncssh."""
    if "asyncssh" not in sys.modules and Finder not in sys.meta_path:
        sys.meta_path.insert(0, Finder)


def uninstall() -> None:
    if Finder in sys.meta_path:
        sys.meta_path.remove(Finder)
