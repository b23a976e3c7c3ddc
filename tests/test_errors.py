"""The error tree as users catch it: one root, a class per reason, the old kind strings."""

import pickle
import socket

import pytest

import sshjobs
from sshjobs import errors
from sshjobs.inventory import Host

# The kind strings Result.error.type has always shown, and the class each now has.
KINDS = {
    "ConnectTimeout": errors.ConnectTimeout, "ConnectionRefused": errors.ConnectionRefused,
    "NameError": errors.HostNameError, "AuthenticationError": errors.AuthenticationError,
    "HostKeyError": errors.HostKeyError, "ConnectionError": errors.ConnectFailed, "HostLost": errors.HostLost,
    "WorkerStartError": errors.WorkerStartError, "WorkerLost": errors.WorkerLost,
    "PythonMismatch": errors.PythonMismatch, "InstallError": errors.InstallError,
    "OfflineError": errors.OfflineError, "UploadError": errors.UploadError, "UvUnavailable": errors.UvUnavailable,
    "Timeout": errors.Timeout, "PicklingError": errors.PicklingError,
    "UnpicklableResult": errors.UnpicklableResult, "UnsafeResult": errors.UnsafeResult,
    "ProtocolError": errors.ProtocolError, "NoHosts": errors.NoHosts, "NotConnected": errors.NotConnected,
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_is_a_class_of_the_tree_with_its_old_string(kind):
    error = errors.make_error(kind, "why", host="h1")
    assert type(error) is KINDS[kind] and error.type == kind == KINDS[kind].kind
    assert isinstance(error, sshjobs.SshjobsError) and str(error) == f"{kind}: why" and error.host == "h1"
    assert getattr(sshjobs, type(error).__name__) is type(error)  # exported from the package
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and (again.type, again.message, again.host) == (kind, "why", "h1")


def test_a_job_s_own_exception_name_is_a_remote_error_never_a_host_error():
    error = errors.RemoteError("ConnectionError", "x")
    assert error.type == "ConnectionError" and not isinstance(error, errors.HostError)
    assert isinstance(errors.make_error("KeyError", "k"), errors.RemoteError)
    remote = pickle.loads(pickle.dumps(errors.RemoteError("KeyError", "k", "tb", "h")))
    assert (remote.type, remote.message, remote.traceback, remote.host) == ("KeyError", "k", "tb", "h")


def test_config_errors_are_value_errors_and_read_as_their_message():
    for cls in (errors.InventoryError, errors.RequirementsError, errors.UsageError):
        error = cls("hosts.toml: host 'a': unknown key 'prot'")
        assert isinstance(error, ValueError) and isinstance(error, errors.ConfigError)
        assert str(error) == "hosts.toml: host 'a': unknown key 'prot'"
    with pytest.raises(ValueError):
        sshjobs.Inventory.from_hosts([])


def test_a_refused_host_and_a_job_raising_connection_error_differ_by_class(inv):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    dead = Host("gone", address="127.0.0.1", port=port, user="nobody", known_hosts=inv.hosts[0].known_hosts)

    def job():
        raise ConnectionError("the job's own")

    results = sshjobs.Inventory([inv.hosts[0], dead]).gather(job)
    assert results[0].error.type == "ConnectionError" and isinstance(results[0].error, sshjobs.RemoteError)
    assert "the job's own" in results[0].error.traceback
    assert results[1].error.type == "ConnectionRefused" and isinstance(results[1].error, sshjobs.ConnectError)
    with pytest.raises(sshjobs.HostError):
        results[1].unwrap()


def test_the_one_shot_calls_report_progress(inv):
    events = []
    results = inv.select("node01,node02").map(lambda x: x + 1, range(4), on_event=lambda h, e, i: events.append(e))
    assert [r.value for r in results] == [1, 2, 3, 4]
    assert {"connecting", "connected", "running", "done"} <= set(events)
