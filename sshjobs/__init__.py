"""sshjobs: run Python functions on SSH hosts that have nothing but sshd and python3."""

from .api import Cluster
from .inventory import Host, Inventory, InventoryError
from .result import RemoteError, Result, Timeout

__all__ = ["Cluster", "Host", "Inventory", "InventoryError", "RemoteError", "Result", "Timeout"]
__version__ = "0.1.0"
