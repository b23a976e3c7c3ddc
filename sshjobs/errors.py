"""Every error sshjobs raises or puts in a Result, as one tree.

An error's reason is its class; ``kind`` (a class attribute) is the string that
``Result.error.type`` and the CLI show, kept stable across versions.  This module imports
nothing else of sshjobs, so every other module can use it.

    SshjobsError
    ├── ConfigError (also a ValueError)    input that cannot be used; nothing was contacted
    │   ├── InventoryError                 an inventory file, dict or host list
    │   ├── RequirementsError              a requirements list or file
    │   ├── UsageError                     a CLI target, argument or job file
    │   └── JournalError                   a journal file of another map (or not one at all)
    ├── LabError (also a RuntimeError)     the local lab or the Docker cluster
    ├── SessionError (also a RuntimeError) a session (`sshjobs up`) that cannot start, or a folder not private
    ├── ClusterClosed (also a RuntimeError)  a call on a closed Cluster (or outside its event loop)
    ├── HostError                          the host could not run the job
    │   ├── ConnectError                   no SSH session: the host was never reached
    │   │   ├── ConnectTimeout             "ConnectTimeout"
    │   │   ├── ConnectionRefused          "ConnectionRefused"
    │   │   ├── HostNameError              "NameError": the name does not resolve
    │   │   ├── AuthenticationError        "AuthenticationError"
    │   │   ├── HostKeyError               "HostKeyError"
    │   │   └── ConnectFailed              "ConnectionError": any other way a connect fails
    │   ├── HostLost                       "HostLost": the connection dropped or stopped answering
    │   ├── NotConnected                   "NotConnected"
    │   ├── NoHosts                        "NoHosts": no host was left to run the job
    │   ├── WorkerError                    the worker process
    │   │   ├── WorkerStartError           "WorkerStartError": it could not start
    │   │   ├── WorkerLost                 "WorkerLost": it ended under a job
    │   │   └── PythonMismatch             "PythonMismatch": another Python minor version
    │   ├── InstallError                   "InstallError": an environment could not be built
    │   │   ├── UvUnavailable              "UvUnavailable": no uv on the host, none to be had
    │   │   ├── OfflineError               "OfflineError": wheels for an offline host
    │   │   └── UploadError                "UploadError": SFTP upload to the host
    │   └── TransferError                  "TransferError": put, get or sync of files on the host
    └── JobError                           the job ran (or was sent) and gave no value
        ├── RemoteError                    the job raised: ``type`` is its exception's name
        ├── Timeout                        "Timeout": it overran its timeout and was killed
        ├── PicklingError                  "PicklingError": function or arguments do not pickle
        ├── UnpicklableResult              "UnpicklableResult": its value does not unpickle here
        ├── UnsafeResult                   "UnsafeResult": refused by safe_results
        └── ProtocolError                  "ProtocolError": a reply that cannot be decoded

Every error has ``type`` (the kind), ``message``, ``host`` (inventory name or None) and
``traceback`` (the remote traceback text, for a job's own exception).
"""

from __future__ import annotations

import builtins
import sys


class SshjobsError(Exception):
    """The root of every error sshjobs raises or reports."""

    kind = "SshjobsError"

    def __init__(self, message: str = "", host: str | None = None, traceback: str = ""):
        super().__init__(message)
        self.message = message
        self.host = host
        self.traceback = traceback

    @property
    def type(self) -> str:
        return self.kind

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type

    def __reduce__(self):
        return (type(self), (self.message, self.host, self.traceback))


# -- configuration ------------------------------------------------------------------------
class ConfigError(SshjobsError, ValueError):
    """Input that cannot be used: nothing was contacted."""

    kind = "ConfigError"

    def __str__(self) -> str:
        return self.message


class InventoryError(ConfigError):
    """An inventory file, dict or host list is wrong; the message names the file, host and key."""

    kind = "InventoryError"


class RequirementsError(ConfigError):
    """A requirements list or file cannot be used (a missing file, an unsupported line)."""

    kind = "RequirementsError"


class UsageError(ConfigError):
    """A command line's target, argument or job file cannot be used."""

    kind = "UsageError"


class JournalError(ConfigError):
    """A map's journal cannot be used for this call: written by another function or for
    other items (the message says what differs), or not a journal."""

    kind = "JournalError"


class LabError(SshjobsError, RuntimeError):
    """The local lab of sshd servers (or the Docker cluster) cannot be started or stopped."""

    kind = "LabError"

    def __str__(self) -> str:
        return self.message


class SessionError(SshjobsError, RuntimeError):
    """A session (``sshjobs up``) could not be started, or its socket folder is not this
    user's alone."""

    kind = "SessionError"

    def __str__(self) -> str:
        return self.message


class ClusterClosed(SshjobsError, RuntimeError):
    """A call on a Cluster that was closed, or made outside the event loop it started on
    (its ``asyncio.run`` has ended): its connections are gone; make a new Cluster."""

    kind = "ClusterClosed"

    def __str__(self) -> str:
        return self.message


# -- hosts ----------------------------------------------------------------------------------
class HostError(SshjobsError):
    """The host could not run the job."""

    kind = "HostError"


class ConnectError(HostError):
    """The host could not be reached or logged in to."""

    kind = "ConnectionError"


class ConnectTimeout(ConnectError):
    """No SSH session within ``connect_timeout``."""

    kind = "ConnectTimeout"


class ConnectionRefused(ConnectError):
    """Nothing listens on the host's SSH port."""

    kind = "ConnectionRefused"


class HostNameError(ConnectError):
    """The host's name does not resolve."""

    kind = "NameError"


class AuthenticationError(ConnectError):
    """The host refused every key (or the password) for the user."""

    kind = "AuthenticationError"


class HostKeyError(ConnectError):
    """The host's key is not the one known_hosts lists (or cannot be recorded)."""

    kind = "HostKeyError"


class ConnectFailed(ConnectError):
    """Any other way a connect fails (a reset, a disconnect during login)."""

    kind = "ConnectionError"


class HostLost(HostError):
    """The connection dropped, or the host stopped answering keepalives."""

    kind = "HostLost"


class NotConnected(HostError):
    """The host is not connected (yet)."""

    kind = "NotConnected"


class NoHosts(HostError):
    """No host was left to run the job."""

    kind = "NoHosts"


class WorkerError(HostError):
    """The worker process on the host."""

    kind = "WorkerError"


class WorkerStartError(WorkerError):
    """The worker could not start (no such interpreter, no channel, no HELLO in time)."""

    kind = "WorkerStartError"


class WorkerLost(WorkerError):
    """The worker process ended under a job (os._exit, a signal, the OOM killer)."""

    kind = "WorkerLost"


class PythonMismatch(WorkerError):
    """The host's Python is another minor version than the controller's."""

    kind = "PythonMismatch"


class InstallError(HostError):
    """An environment could not be built on the host; the message ends with uv's."""

    kind = "InstallError"


class UvUnavailable(InstallError):
    """No uv on the host and no way to get one there."""

    kind = "UvUnavailable"


class OfflineError(InstallError):
    """Wheels for an offline host could not be downloaded on the controller."""

    kind = "OfflineError"


class UploadError(InstallError):
    """Uploading uv or wheels to the host failed."""

    kind = "UploadError"


class TransferError(HostError):
    """Files could not be copied to or from the host (``put``, ``get``, ``sync``): a path
    that is not there or not allowed, a full disk; the message names the host and the path."""

    kind = "TransferError"


# -- jobs -----------------------------------------------------------------------------------
class JobError(SshjobsError):
    """The job ran, or was sent, and gave no value."""

    kind = "JobError"


class RemoteError(JobError):
    """The job raised on the host: ``type`` is its exception's name, ``module`` the module
    that defines it, ``traceback`` the remote traceback text.

    Made by ``remote_error``, it is an instance of the job's own exception class too when
    the controller has that class (its module imported here), so that ``except
    ValueError`` catches a remote ValueError.  Such an error is not the original object:
    its ``args`` are ``(message,)``, and the class's other attributes are not set."""

    kind = "RemoteError"

    def __init__(self, type: str, message: str = "", traceback: str = "", host: str | None = None,
                 module: str | None = None):
        SshjobsError.__init__(self, message, host, traceback)
        self._type = type
        self.module = module

    @property
    def type(self) -> str:
        return self._type

    def __reduce__(self):
        return (remote_error, (self._type, self.message, self.traceback, self.host, self.module))


_DUALS: dict[type, type] = {}


def _local_class(module: str | None, qualname: str) -> type | None:
    """The controller's class ``module.qualname``, when that module is imported here and
    the class is an Exception that can be a RemoteError too."""
    if not module or "<" in qualname:
        return None
    obj = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type) or not issubclass(obj, Exception) or issubclass(obj, SshjobsError):
        return None
    return obj


def _dual(cls: type) -> type | None:
    dual = _DUALS.get(cls)
    if dual is None and cls not in _DUALS:
        def __init__(self, type, message="", traceback="", host=None, module=None):
            RemoteError.__init__(self, type, message, traceback, host, module)  # not cls.__init__

        def __new__(klass, type, message="", *rest, **kw):
            return cls.__new__(klass, message)

        try:
            dual = builtins.type(f"RemoteError({cls.__name__})", (RemoteError, cls),
                                 {"__init__": __init__, "__new__": __new__, "__module__": __name__,
                                  "__qualname__": f"RemoteError({cls.__qualname__})"})
        except TypeError:  # a class that cannot be subclassed, or whose layout conflicts
            dual = None
        _DUALS[cls] = dual
    return dual


def remote_error(type: str, message: str = "", traceback: str = "", host: str | None = None,
                 module: str | None = None) -> RemoteError:
    """The RemoteError for a job's exception ``type`` (its qualified name) of ``module``:
    also an instance of that class when the controller has it (see RemoteError)."""
    cls = _local_class(module, type)
    dual = _dual(cls) if cls is not None else None
    if dual is not None:
        try:
            return dual(type, message, traceback, host, module)
        except Exception:  # an unusual __new__: the plain error says as much
            pass
    return RemoteError(type, message, traceback, host, module)


class Timeout(JobError):
    """The job overran its ``timeout``; its process on the host was killed."""

    kind = "Timeout"


class PicklingError(JobError):
    """The function or an argument cannot be pickled (caught before anything is sent)."""

    kind = "PicklingError"


class UnpicklableResult(JobError):
    """The job's value could not be unpickled on the controller."""

    kind = "UnpicklableResult"


class UnsafeResult(JobError):
    """safe_results refused a type in the job's value."""

    kind = "UnsafeResult"


class ProtocolError(JobError):
    """A reply from the worker that cannot be decoded."""

    kind = "ProtocolError"


def _kinds() -> dict[str, type[SshjobsError]]:
    found: dict[str, type[SshjobsError]] = {}
    todo = [SshjobsError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is not RemoteError:
            found.setdefault(cls.kind, cls)
    found["ConnectionError"] = ConnectFailed
    return found


KINDS = _kinds()  # kind string -> class, for errors that arrive as strings (provisioning replies)


def make_error(kind: str, message: str, traceback: str = "", host: str | None = None) -> SshjobsError:
    """The error of a kind (a string from a host or a record); a job's own exception's name
    (any other string) becomes a RemoteError."""
    cls = KINDS.get(kind)
    if cls is None or cls in (SshjobsError, ConfigError, HostError, WorkerError, JobError):
        return RemoteError(kind, message, traceback, host)
    return cls(message, host, traceback)


__all__ = [name for name, obj in globals().items() if isinstance(obj, type) and issubclass(obj, SshjobsError)]
