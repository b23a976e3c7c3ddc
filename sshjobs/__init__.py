"""sshjobs: run Python functions on SSH hosts that have nothing but sshd and python3.

``Cluster``, ``Executor``, ``Inventory``, ``Host``, ``Journal`` and ``Result`` are imported when first used (module
``__getattr__``), so that ``import sshjobs`` (and ``sshjobs --version``) does not import
asyncssh and the rest of the data path; the error tree is imported at once (it imports
nothing)."""

from . import sshimport
from .errors import *  # noqa: F403  (the whole tree: every error a user can meet)
from .errors import __all__ as _errors
from .version import __version__  # noqa: F401

sshimport.install()  # before anything imports asyncssh (see sshimport)

__all__ = ["Cluster", "Executor", "Host", "Inventory", "Journal", "Result", *_errors]  # noqa: F405  (the first six: __getattr__)

_LAZY = {"Cluster": "cluster", "Executor": "executor", "Inventory": "api", "Host": "inventory", "Journal": "journal",
         "Result": "result"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sshjobs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
