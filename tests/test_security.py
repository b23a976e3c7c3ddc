"""Bad input and security against the real lab: clear per-host errors, host keys
(accept-new), no secrets in logs, a private workdir, hostile names quoted, safe_results."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import shutil
import stat
import subprocess
from dataclasses import replace

import asyncssh
import pytest

from sshjobs import Inventory, InventoryError
from sshjobs.inventory import Host
from sshjobs.safe import RefusedType, make_loads


# -- bad input: each host's mistake is its own -------------------------------------------
def test_bad_hosts_fail_clearly_and_affect_nothing_else(inv, tmp_path):
    stranger = tmp_path / "stranger_key"
    stranger.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh"))
    stranger.chmod(0o600)
    good = inv.hosts[0]
    hosts = [
        good,
        replace(inv.hosts[1], identity=str(stranger)),                 # a key the host does not know
        Host("nowhere", address="no-such-host.invalid", user="x", connect_timeout=5),
        replace(inv.hosts[2], python="/nonexistent/python3"),          # a host without that python
        inv.hosts[3],
        replace(inv.hosts[5], user="we ird'\"$(touch /tmp/sshjobs-pwned-user)"),  # a hostile user name
    ]
    results = Inventory(hosts).gather(lambda: "fine")
    assert [r.host for r in results] == [h.name for h in hosts]
    assert results[0].value == "fine" and results[4].value == "fine"
    assert results[5].error.type == "AuthenticationError"
    assert not os.path.exists("/tmp/sshjobs-pwned-user")
    auth, name, python = results[1].error, results[2].error, results[3].error
    assert auth.type == "AuthenticationError" and inv.hosts[1].user in auth.message
    assert name.type == "NameError" and "does not resolve" in name.message
    assert python.type == "WorkerStartError" and "/nonexistent/python3" in python.message


def test_missing_identity_file_and_unknown_limit_are_inventory_errors(inv, tmp_path):
    with pytest.raises(InventoryError, match="identity file not found"):
        Inventory.from_hosts([{"name": "a", "identity": str(tmp_path / "nope")}])
    with pytest.raises(InventoryError, match=r"--limit 'node1' matches no host or group \(did you mean"):
        inv.select("node1")


# -- host keys ---------------------------------------------------------------------------
def test_accept_new_records_the_key_on_first_contact_and_refuses_a_changed_key(inv, lab, tmp_path):
    known = tmp_path / "ssh" / "known_hosts"  # not there yet
    first = replace(inv.hosts[0], known_hosts=str(known), host_key_checking="accept-new")
    assert Inventory([first]).gather(lambda: "hi")[0].value == "hi"
    recorded = known.read_text().split()
    real = lab.known_hosts.read_text().splitlines()[0].split()
    assert recorded == real  # "127.0.N.1 ssh-ed25519 AAAA..."
    assert stat.S_IMODE(known.stat().st_mode) == 0o600
    # the recorded key is now checked strictly, by accept-new and by the default
    for checking in ("accept-new", True):
        assert Inventory([replace(first, host_key_checking=checking)]).gather(lambda: 1)[0].value == 1
    assert known.read_text().count("\n") == 1  # recorded once
    # the host shows another key than the recorded one: refused
    other_key = lab.known_hosts.read_text().splitlines()[1].split(None, 1)[1]
    known.write_text(f"{real[0]} {other_key}\n")
    r = Inventory([first]).gather(lambda: "ran")[0]
    assert not r.ok and r.error.type == "HostKeyError"


def test_host_key_checking_false_warns_on_every_run(inv, caplog):
    loose = Inventory([replace(inv.hosts[0], host_key_checking=False, known_hosts=None)])
    caplog.set_level(logging.WARNING, logger="sshjobs")
    for _ in range(2):
        assert loose.gather(lambda: 1)[0].value == 1
    warnings = [r for r in caplog.records if "key checking is off" in r.getMessage()]
    assert len(warnings) == 2


# -- secrets -----------------------------------------------------------------------------
def test_no_secret_in_logs_errors_or_the_hosts_process_list(inv, lab, tmp_path, caplog):
    token = "tok-S3CRET-4242"
    stranger = tmp_path / "stranger_key"
    key = asyncssh.generate_private_key("ssh-ed25519")
    stranger.write_bytes(key.export_private_key("openssh"))
    stranger.chmod(0o600)
    key_body = "".join(stranger.read_text().splitlines()[1:-1])
    caplog.set_level(logging.DEBUG)  # sshjobs and asyncssh, everything

    def job():
        import os
        import subprocess
        seen = subprocess.run(["ps", "-u", str(os.getuid()), "-o", "args="], capture_output=True, text=True).stdout
        return os.environ.get("API_TOKEN"), seen

    hosts = [replace(inv.hosts[0], env=(("API_TOKEN", token),)),
             replace(inv.hosts[1], identity=str(stranger))]
    results = Inventory(hosts).gather(job)
    value, processes = results[0].value
    assert value == token  # the job has it...
    assert token not in processes  # ...but no command line on the host shows it
    assert results[1].error.type == "AuthenticationError"
    text = caplog.text + "".join(repr(r) + r.error.traceback for r in results if r.error)
    assert "Command:" in caplog.text  # asyncssh did log the worker's command line
    assert token not in text
    assert key_body[:40] not in text and "PRIVATE KEY" not in text


# -- the host side: a private workdir, hostile names quoted --------------------------------
HOSTILE = "sj dir 'q\" $(touch /tmp/sshjobs-pwned-$USER) `id` ;x"


def test_hostile_workdir_env_and_name_are_quoted_and_the_workdir_is_private(inv, lab):
    index = 4
    h = lab.hosts[index]
    workdir = lab.home(index) / ".cache" / HOSTILE
    shutil.rmtree(workdir, ignore_errors=True)  # lab users outlive a test session
    host = replace(inv.hosts[index], name="evil $(id) 'name\"", workdir=f"~/.cache/{HOSTILE}",
                   env=(("WEIRD", "$(touch /tmp/sshjobs-pwned-env) 'x\""), ("PYTHONDONTWRITEBYTECODE", "1")))

    def look():
        import os
        return os.environ["WEIRD"], os.environ.get("PYTHONDONTWRITEBYTECODE")

    r = Inventory([host]).gather(look)[0]
    assert r.ok, r.error
    assert r.value == ("$(touch /tmp/sshjobs-pwned-env) 'x\"", "1")
    made = Inventory([host]).gather(lambda: (lambda: 1))[0]  # a result only cloudpickle pickles: it is shipped
    assert made.ok and made.value() == 1, made.error
    assert not any(p.startswith("sshjobs-pwned") for p in os.listdir("/tmp"))
    assert workdir.is_dir()
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
    # everything sshjobs created there (the shipped cloudpickle) is inside, private
    for root, dirs, files in os.walk(workdir):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) & 0o077 == 0, f
    assert any(files for _, _, files in os.walk(workdir))
    owner = subprocess.run(["stat", "-c", "%U", str(workdir)], capture_output=True, text=True).stdout.strip()
    assert owner == h.user


# -- safe_results --------------------------------------------------------------------------
class Sneaky:
    """A result whose unpickling runs code: what a compromised host could send."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_safe_results_refuses_code_and_unknown_types_and_names_them(inv, tmp_path):
    one = inv.select("node06")
    plain = lambda: {"a": [1, 2.5, "x", b"y", None, True], "s": {1, 2}, "c": complex(1, 2),
                     "t": __import__("datetime").timedelta(seconds=3)}
    r = one.gather(plain, safe_results=True)[0]
    assert r.ok and r.value["s"] == {1, 2} and r.value["t"].total_seconds() == 3

    unsafe_dir = tmp_path / "ran-unsafe"
    r = one.gather(lambda p: Sneaky(p), str(unsafe_dir))[0]
    assert unsafe_dir.is_dir()  # without safe_results a result can run code here: the trust model

    safe_dir = tmp_path / "ran-safe"
    r = one.gather(lambda p: Sneaky(p), str(safe_dir), safe_results=True)[0]
    assert not safe_dir.exists()
    assert r.error.type == "UnsafeResult" and "'posix.mkdir'" in r.error.message

    path = lambda: __import__("pathlib").PurePosixPath("/etc")
    results = one.map(lambda _: path(), [0], safe_results=True)
    assert results[0].error.type == "UnsafeResult" and "pathlib.PurePosixPath" in results[0].error.message
    # an explicit allowlist entry lets it through; so does it for submit
    async def go():
        async with one.connect(safe_results=["pathlib.PurePosixPath"]) as cluster:
            return await cluster.submit(path), await cluster.submit(lambda p: Sneaky(p), str(safe_dir))
    allowed, refused = asyncio.run(go())
    assert str(allowed.value) == "/etc"
    assert refused.error.type == "UnsafeResult" and not safe_dir.exists()


def test_safe_results_from_the_inventory(inv, tmp_path):
    host = replace(inv.hosts[6], safe_results=True)
    target = tmp_path / "pwned"
    r = Inventory([host]).gather(lambda p: Sneaky(p), str(target))[0]
    assert r.error.type == "UnsafeResult" and not target.exists()
    assert Inventory([host]).gather(lambda: [1, "two"])[0].value == [1, "two"]


def test_safe_results_can_only_tighten(inv, tmp_path):
    """safe_results=False on a call does not loosen what the inventory or the Cluster asked."""
    strict_host = Inventory([replace(inv.hosts[6], safe_results=True)])
    target = tmp_path / "pwned"
    sneaky = lambda p: Sneaky(p)  # noqa: E731
    assert strict_host.gather(sneaky, str(target), safe_results=False)[0].error.type == "UnsafeResult"
    assert strict_host.map(sneaky, [str(target)], safe_results=False)[0].error.type == "UnsafeResult"

    async def go():
        async with inv.select("node07").connect(safe_results=True) as cluster:
            return [await cluster.submit(sneaky, str(target), safe_results=False),
                    (await cluster.gather(sneaky, str(target), safe_results=False))[0],
                    (await cluster.map(sneaky, [str(target)], safe_results=False))[0]]

    assert [r.error.type for r in asyncio.run(go())] == ["UnsafeResult"] * 3
    assert not target.exists()
    # a list on the call adds names to what is allowed, on top of the Cluster's setting
    allowed = strict_host.gather(lambda: __import__("pathlib").PurePosixPath("/etc"),
                                 safe_results=["pathlib.PurePosixPath"])[0]
    assert str(allowed.value) == "/etc"


def test_safe_loader_accepts_numpy_arrays_and_dtypes_and_refuses_the_rest():
    np = pytest.importorskip("numpy")
    loads = make_loads()
    values = [np.arange(12.0).reshape(3, 4), np.arange(6).reshape(2, 3).T, np.array(["a", "bc"]),
              np.zeros(2, dtype=[("x", "i4"), ("y", "f8")]), np.dtype("float32"), np.float64(2.5),
              np.array([1, "mixed"], dtype=object)]
    for v in values:
        got = loads(pickle.dumps(v, protocol=5))
        assert type(got) is type(v)
        assert (np.array_equal(got, v) if isinstance(v, np.ndarray) else got == v)
    for bad, name in [(np.random.default_rng(1), "numpy.random"), (eval, "builtins.eval"),
                      (Sneaky("/x"), "posix.mkdir")]:
        with pytest.raises(RefusedType, match=name):
            loads(pickle.dumps(bad))


def test_safe_results_covers_the_whole_result_frame_not_only_values():
    from sshjobs.remote import protocol
    from sshjobs.worker import decode_results

    evil = pickle.dumps(Sneaky("/tmp/sshjobs-never"))  # a hostile host's "meta" part
    body = protocol.META_LEN.pack(len(evil)) + evil
    with pytest.raises(RefusedType, match="posix.mkdir"):
        decode_results(body, make_loads())
    assert not os.path.exists("/tmp/sshjobs-never")
