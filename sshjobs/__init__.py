"""sshjobs: run Python functions on SSH hosts that have nothing but sshd and python3."""

from .api import Cluster, Inventory
from .errors import *  # noqa: F403  (the whole tree: every error a user can meet)
from .errors import __all__ as _errors
from .inventory import Host
from .result import Result

__all__ = ["Cluster", "Host", "Inventory", "Result", *_errors]
from .version import __version__  # noqa: E402,F401
