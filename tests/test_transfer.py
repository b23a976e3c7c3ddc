"""put, get and sync of files against the 10-host lab (each host a local user, so the files
are checked under the users' home folders), the bad-input cases and the CLI commands."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from sshjobs import ConfigError, TransferError

from .test_cli import json_lines, sshjobs


@pytest.fixture
def tag(lab):
    """A folder name unique to the test, removed from every host's home afterwards."""
    name = f"xfer-{uuid.uuid4().hex[:8]}"
    yield name
    for i in range(len(lab.hosts)):
        shutil.rmtree(lab.home(i) / name, ignore_errors=True)


def own(lab, i: int, path: Path) -> None:
    """Give a file or folder made here (as root) to host i's user, as if the host had made it."""
    pw = pwd.getpwnam(lab.hosts[i].user)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chown(p, pw.pw_uid, pw.pw_gid)


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


class Events:
    def __init__(self):
        self.seen: list[tuple[str, str, dict]] = []

    def __call__(self, host, event, info):
        self.seen.append((host, event, info))

    def of(self, event: str) -> list[tuple[str, dict]]:
        return [(h, i) for h, e, i in self.seen if e == event]


# -- put ------------------------------------------------------------------------------------
def test_put_a_file_and_a_folder(lab, inv, tag, tmp_path):
    one = tmp_path / "one.txt"
    one.write_bytes(b"hello\n")
    one.chmod(0o750)
    events = Events()
    results = inv.put(one, f"{tag}/in", on_event=events)
    assert [r.host for r in results] == [h.name for h in lab.hosts]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    for i, r in enumerate(results):
        arrived = lab.home(i) / tag / "in" / "one.txt"
        assert arrived.read_bytes() == b"hello\n"
        assert arrived.stat().st_mode & 0o777 == 0o750  # the mode goes with the file
        assert arrived.stat().st_uid == pwd.getpwnam(lab.hosts[i].user).pw_uid
        assert r.value == {"files": 1, "bytes": 6, "remote": str(arrived)}
    assert {h for h, _ in events.of("transferring")} == {h.name for h in lab.hosts}
    assert [(h, i["files"], i["op"]) for h, i in events.of("transferred")].count((lab.hosts[0].name, 1, "put")) == 1

    folder = make_tree(tmp_path / "data", {"a.txt": b"a" * 10, "sub/b.bin": os.urandom(300_000), "sub/deeper/c": b""})
    (folder / "empty").mkdir()
    results = inv.put(folder, f"~/{tag}/in")
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    for i, r in enumerate(results):
        top = lab.home(i) / tag / "in" / "data"
        assert r.value == {"files": 3, "bytes": 300_010, "remote": str(top)}
        for rel in ("a.txt", "sub/b.bin", "sub/deeper/c"):
            assert (top / rel).read_bytes() == (folder / rel).read_bytes()
        assert (top / "empty").is_dir()
        assert not [p for p in top.rglob("*") if p.name.endswith(".sshjobs-part")]  # no temporary file left


def test_a_missing_local_path_fails_before_anything_is_contacted(inv, tmp_path):
    events = Events()
    with pytest.raises(ConfigError, match="no such file or folder on the controller"):
        inv.put(tmp_path / "nope", "somewhere", on_event=events)
    with pytest.raises(ConfigError, match="no such file or folder on the controller"):
        inv.sync(tmp_path / "nope", "somewhere", on_event=events)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        inv.sync(tmp_path / "f", "somewhere", on_event=events)
    with pytest.raises(ConfigError, match="empty"):
        inv.put(tmp_path / "f", "", on_event=events)
    assert events.seen == []  # no host was even connected to


def test_a_remote_folder_outside_the_users_permissions_fails_that_host_only(lab, inv, tag, tmp_path):
    (lab.home(2) / tag).mkdir()  # root's, mode 0755: host 2's user cannot write in it
    src = tmp_path / "f.txt"
    src.write_text("x")
    events = Events()
    results = inv.put(src, f"{tag}/deep", on_event=events)
    bad = results[2]
    assert not bad.ok and isinstance(bad.error, TransferError) and bad.error.type == "TransferError"
    assert "permission denied" in bad.error.message and f"{tag}/deep" in bad.error.message
    assert [r.ok for i, r in enumerate(results) if i != 2] == [True] * 9
    assert [h for h, _ in events.of("transfer-failed")] == [lab.hosts[2].name]

    results = inv.put(src, "/etc/sshjobs-no-such-right")
    assert all(not r.ok and "permission denied" in r.error.message for r in results)
    assert not Path("/etc/sshjobs-no-such-right").exists()


def test_a_full_disk_fails_that_host_and_the_others_finish(lab, inv, tag, tmp_path):
    mount = lab.home(0) / tag
    mount.mkdir()
    pw = pwd.getpwnam(lab.hosts[0].user)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=1m,uid={pw.pw_uid},gid={pw.pw_gid},mode=0755",
                           "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(3 << 20))
        results = inv.put(big, tag)
        bad = results[0]
        assert not bad.ok and isinstance(bad.error, TransferError)
        assert "no space left on the host's disk" in bad.error.message, bad.error.message
        assert os.listdir(mount) == []  # the part written was removed
        assert all(r.ok and r.value["bytes"] == 3 << 20 for r in results[1:]), results
        for i in range(1, 10):
            assert (lab.home(i) / tag / "big.bin").stat().st_size == 3 << 20
        # sync reports it the same way
        folder = make_tree(tmp_path / "tree", {"x.bin": os.urandom(2 << 20)})
        results = inv.sync(folder, tag)
        assert not results[0].ok and "no space left" in results[0].error.message
        assert all(r.ok for r in results[1:])
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_host_that_cannot_be_reached_fails_alone(lab, inv, tag, tmp_path):
    from dataclasses import replace

    from sshjobs import Inventory

    src = tmp_path / "f.txt"
    src.write_text("x")
    hosts = inv.select("node01,node02").hosts
    results = Inventory([hosts[0], replace(hosts[1], name="down", port=1), hosts[1]]).put(src, tag)
    assert [r.host for r in results] == ["node01", "down", "node02"]
    assert results[0].ok and results[2].ok
    assert results[1].error.type == "ConnectionRefused"


# -- get ------------------------------------------------------------------------------------
def test_get_puts_each_hosts_copy_in_a_folder_named_after_it(lab, inv, tag, tmp_path):
    for i in range(len(lab.hosts)):
        make_tree(lab.home(i) / tag, {"log.txt": f"host {i}\n".encode(), "run/a.out": bytes([i]) * 1000})
        own(lab, i, lab.home(i) / tag)
    out = tmp_path / "out"
    results = inv.get(f"{tag}/log.txt", out)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    for i, (h, r) in enumerate(zip(lab.hosts, results)):
        assert (out / h.name / "log.txt").read_text() == f"host {i}\n"
        assert r.value == {"files": 1, "bytes": len(f"host {i}\n"), "local": str(out / h.name / "log.txt")}
    results = inv.get(f"~/{tag}", out)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    for i, (h, r) in enumerate(zip(lab.hosts, results)):
        assert (out / h.name / tag / "run" / "a.out").read_bytes() == bytes([i]) * 1000
        assert r.value["files"] == 2 and r.value["local"] == str(out / h.name / tag)


def test_get_of_a_path_a_host_lacks_fails_that_host(lab, inv, tag, tmp_path):
    (lab.home(1) / tag).mkdir()
    (lab.home(1) / tag / "only-here").write_text("1")
    results = inv.get(f"{tag}/only-here", tmp_path)
    assert results[1].ok
    assert all(not r.ok and "no such file or folder" in r.error.message and f"{tag}/only-here" in r.error.message
               for i, r in enumerate(results) if i != 1)
    secret = lab.home(3) / tag
    secret.mkdir()
    (secret / "s").write_text("s")
    secret.chmod(0o700)  # root's: host 3's user cannot look inside
    results = inv.get(f"{tag}/s", tmp_path / "again")
    assert not results[3].ok and "permission denied" in results[3].error.message


# -- sync -----------------------------------------------------------------------------------
def test_sync_sends_only_what_changed_and_deletes_on_request(lab, inv, tag, tmp_path):
    files = {f"f{n:02d}.txt": f"file {n}\n".encode() for n in range(20)}
    files["sub/inner.bin"] = os.urandom(5000)
    local = make_tree(tmp_path / "src", files)
    results = inv.sync(local, tag)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    total = sum(len(v) for v in files.values())
    for i, r in enumerate(results):
        assert r.value == {"files": 21, "bytes": total, "unchanged": 0, "deleted": 0, "remote": str(lab.home(i) / tag)}
        assert (lab.home(i) / tag / "sub" / "inner.bin").read_bytes() == files["sub/inner.bin"]

    results = inv.sync(local, tag)  # unchanged: nothing sent
    assert [r.value["files"] for r in results] == [0] * 10
    assert [r.value["unchanged"] for r in results] == [21] * 10

    (local / "f03.txt").write_bytes(b"changed!\n")
    os.utime(local / "f05.txt")  # touched, same content: not sent
    results = inv.sync(local, f"~/{tag}")
    assert [(r.value["files"], r.value["bytes"], r.value["unchanged"]) for r in results] == [(1, 9, 20)] * 10
    assert (lab.home(4) / tag / "f03.txt").read_bytes() == b"changed!\n"

    # a file changed on one host only goes back to that host
    (lab.home(6) / tag / "f07.txt").write_bytes(b"edited on the host")
    results = inv.sync(local, tag)
    assert [r.value["files"] for r in results] == [1 if i == 6 else 0 for i in range(10)]
    assert (lab.home(6) / tag / "f07.txt").read_bytes() == b"file 7\n"

    (local / "f10.txt").unlink()
    shutil.rmtree(local / "sub")
    results = inv.sync(local, tag)  # without delete, what is gone locally stays
    assert all(r.value["deleted"] == 0 for r in results)
    assert (lab.home(0) / tag / "f10.txt").exists()
    results = inv.sync(local, tag, delete=True)
    assert [r.value["deleted"] for r in results] == [3] * 10  # f10.txt, sub/inner.bin, sub
    for i in range(10):
        assert sorted(p.name for p in (lab.home(i) / tag).iterdir()) == sorted(p.name for p in local.iterdir())


def test_sync_into_a_folder_the_user_cannot_write_fails_that_host(lab, inv, tag, tmp_path):
    (lab.home(5) / tag).mkdir()  # root's: not writable by host 5's user
    local = make_tree(tmp_path / "src", {"a": b"a"})
    results = inv.sync(local, f"{tag}/x")
    assert not results[5].ok and isinstance(results[5].error, TransferError)
    assert "permission denied" in results[5].error.message and f"{tag}/x" in results[5].error.message
    assert all(r.ok for i, r in enumerate(results) if i != 5)


def test_the_async_cluster_reuses_its_connections(lab, inv, tag, tmp_path):
    import asyncio

    local = make_tree(tmp_path / "src", {"a": b"1", "b/c": b"2"})

    async def main():
        async with inv.connect() as cluster:
            first = await cluster.sync(local, tag)
            again = await cluster.sync(local, tag)
            got = await cluster.get(f"{tag}/b/c", tmp_path / "back")
            ran = await cluster.gather(os.getpid)  # jobs still run beside
            return first, again, got, ran

    first, again, got, ran = asyncio.run(main())
    assert [r.value["files"] for r in first] == [2] * 10 and [r.value["files"] for r in again] == [0] * 10
    assert all(r.ok for r in got + ran)
    assert (tmp_path / "back" / lab.hosts[9].name / "c").read_bytes() == b"2"


# -- the command line ---------------------------------------------------------------------------
def test_cli_put_get_sync(lab, tag, tmp_path):
    invfile = str(lab.inventory_path)
    src = make_tree(tmp_path / "src", {"a.txt": b"aaa", "d/b.txt": b"bb"})
    p = sshjobs("put", "-i", invfile, "--limit", "node0[1-3]", src / "a.txt", tag, "--json")
    assert p.returncode == 0, p.stderr
    rows = json_lines(p.stdout)
    assert [r["host"] for r in rows] == ["node01", "node02", "node03"]
    assert all(r["ok"] and r["value"]["files"] == 1 for r in rows)
    assert (lab.home(0) / tag / "a.txt").read_bytes() == b"aaa" and not (lab.home(3) / tag).exists()

    p = sshjobs("sync", "-i", invfile, src, f"{tag}/mirror", "--json")
    assert p.returncode == 0, p.stderr
    assert [r["value"]["files"] for r in json_lines(p.stdout)] == [2] * 10
    (src / "a.txt").unlink()
    p = sshjobs("sync", "-i", invfile, src, f"{tag}/mirror", "--delete")  # plain lines, then the summary
    assert p.returncode == 0, p.stderr
    assert "10 of 10 hosts ok" in p.stdout and "0 files" in p.stdout and "1 deleted" in p.stdout
    assert not (lab.home(7) / tag / "mirror" / "a.txt").exists()

    out = tmp_path / "out"
    p = sshjobs("get", "-i", invfile, f"{tag}/a.txt", out, "--json")
    assert p.returncode == 1  # only node01-03 have it
    rows = json_lines(p.stdout)
    assert [r["ok"] for r in rows] == [True] * 3 + [False] * 7
    assert rows[5]["error"]["type"] == "TransferError" and "no such file or folder" in rows[5]["error"]["message"]
    assert (out / "node02" / "a.txt").read_bytes() == b"aaa"

    p = sshjobs("put", "-i", invfile, tmp_path / "missing", tag)
    assert p.returncode == 2 and "missing" in p.stderr and not p.stdout
    p = sshjobs("sync", "--help")
    assert p.returncode == 0 and "--delete" in p.stdout
    assert json.loads(json.dumps(rows))  # rows are plain JSON


def test_the_tree_bundle_runs_on_a_bare_python3(tmp_path):
    """The host's side of sync on a python3 with nothing of sshjobs (isolated, no site)."""
    from sshjobs.remote import STUB, TREE
    from sshjobs.transfer import digest, scan

    local = make_tree(tmp_path / "local", {"same": b"1", "changed": b"new", "new/inner": b"x"})
    remote = make_tree(tmp_path / "remote", {"same": b"1", "changed": b"old", "extra/gone": b"y", "loose": b"z"})
    tree = scan(local)
    request = {"root": str(remote), "files": {f.rel: [f.size, digest(f)] for f in tree.files}, "dirs": tree.dirs}

    def call(**extra):
        data = TREE.start(None) + json.dumps(dict(request, **extra)).encode()
        done = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", STUB], input=data, capture_output=True,
                              cwd=tmp_path, timeout=30)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.decode().splitlines()[-1])

    reply = call(delete=False)
    assert reply["ok"] and reply["root"] == str(remote)
    assert sorted(reply["send"]) == ["changed", "new/inner"] and reply["unchanged"] == 1 and reply["deleted"] == []
    assert (remote / "new").is_dir() and (remote / "loose").exists()
    reply = call(delete=True)
    assert sorted(reply["deleted"]) == ["extra", "extra/gone", "loose"]
    assert sorted(p.name for p in remote.iterdir()) == ["changed", "new", "same"]
    (remote / "new").rmdir()
    (remote / "new").write_text("a file where a folder goes")
    reply = call(delete=False)
    assert not reply["ok"] and "not a folder on the host" in reply["error"] and str(remote / "new") in reply["error"]


def test_the_live_display_follows_the_transfer_events():
    from sshjobs.display import Progress, describe_transfer

    progress = Progress(["a", "b"])
    progress.event("a", "transferring", {"op": "put", "files": 3, "bytes": 3_000_000, "done_files": 1,
                                         "done_bytes": 1_500_000})
    assert progress.hosts["a"].state == "transferring" and progress.hosts["a"].note == "1/3 files, 1.5 MB of 3.0 MB"
    progress.event("a", "transferred", {"op": "sync", "files": 1, "bytes": 9, "unchanged": 20, "deleted": 2,
                                        "remote": "/home/u/x"})
    assert progress.hosts["a"].state == "done"
    assert progress.hosts["a"].note == "1 file, 9 B sent, 20 unchanged, 2 deleted -> /home/u/x"
    progress.event("b", "transfer-failed", {"op": "get", "type": "TransferError", "error": "x: no such file"})
    assert progress.hosts["b"].state == "failed" and progress.hosts["b"].note == "TransferError: x: no such file"
    assert describe_transfer({"files": 2, "bytes": 2048, "local": "out/a/x"}) == "2 files, 2.0 kB -> out/a/x"
