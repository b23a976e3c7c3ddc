"""Inventory parsing: every mistake gets one clear error naming the file, the host and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sshjobs import Host, Inventory, InventoryError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "hosts.toml"
    p.write_text(text)
    return p


def error_of(tmp_path, text) -> str:
    with pytest.raises(InventoryError) as info:
        Inventory.load(write(tmp_path, text))
    return str(info.value)


def test_full_example_with_defaults_overrides_and_order(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id").write_text("key")
    inv = Inventory.load(write(tmp_path, """
[defaults]
user = "deploy"
port = 22
identity = "keys/id"
known_hosts = "kh"
python = "python3"
slots = 2
connect_timeout = 5
workdir = "~/.cache/sshjobs"
env = { HTTP_PROXY = "http://proxy:3128" }

[hosts.node02]
address = "10.0.0.12"
port = 2222
groups = ["gpu"]

[hosts.node01]
address = "10.0.0.11"
slots = "auto"
env = { EXTRA = "1" }

[hosts."web-1"]
"""))
    assert [h.name for h in inv] == ["node02", "node01", "web-1"]  # file order
    n2, n1, web = inv.hosts
    assert (n2.address, n2.port, n2.user, n2.slots) == ("10.0.0.12", 2222, "deploy", 2)
    assert n1.slots == "auto" and n1.port == 22
    assert web.address == "web-1"  # defaults to the table name
    assert n2.identity == str(tmp_path / "keys" / "id")  # relative to the inventory
    assert n2.known_hosts == str(tmp_path / "kh")
    assert dict(n1.env) == {"HTTP_PROXY": "http://proxy:3128", "EXTRA": "1"}  # merged with defaults
    assert n2.groups == ("gpu",)


def test_toml_syntax_error_has_line_and_column(tmp_path):
    msg = error_of(tmp_path, "[hosts.a]\naddress = \n")
    assert "hosts.toml" in msg and "TOML syntax error" in msg and "line 2" in msg and "column" in msg


def test_unknown_key_suggests_the_right_one(tmp_path):
    msg = error_of(tmp_path, '[hosts.node01]\nadress = "x"\n')
    assert "host 'node01'" in msg and "unknown key 'adress'" in msg and "did you mean 'address'" in msg
    msg = error_of(tmp_path, '[defaults]\nslot = 2\n[hosts.a]\n')
    assert "[defaults]" in msg and "did you mean 'slots'" in msg


def test_wrong_types_name_host_and_key(tmp_path):
    msg = error_of(tmp_path, '[hosts.node01]\nport = "22"\n')
    assert "host 'node01'" in msg and "'port'" in msg and "string" in msg
    assert "'slots'" in error_of(tmp_path, "[hosts.a]\nslots = 0\n")
    assert "'slots'" in error_of(tmp_path, '[hosts.a]\nslots = "many"\n')
    assert "'groups'" in error_of(tmp_path, "[hosts.a]\ngroups = \"gpu\"\n")
    assert "'port'" in error_of(tmp_path, "[hosts.a]\nport = 70000\n")
    assert "'host_key_checking'" in error_of(tmp_path, '[hosts.a]\nhost_key_checking = "maybe"\n')


def test_duplicate_address_and_port(tmp_path):
    msg = error_of(tmp_path, '[hosts.a]\naddress = "h"\n[hosts.b]\naddress = "h"\nport = 22\n')
    assert "host 'b'" in msg and "duplicate address:port h:22" in msg and "'a'" in msg


def test_no_hosts(tmp_path):
    assert "no hosts" in error_of(tmp_path, "[defaults]\nuser = \"x\"\n")
    assert "no hosts" in error_of(tmp_path, "")


def test_missing_identity_file(tmp_path):
    msg = error_of(tmp_path, '[hosts.a]\nidentity = "nope/id_ed25519"\n')
    assert "host 'a'" in msg and "'identity'" in msg and "not found" in msg


def test_missing_file():
    with pytest.raises(InventoryError, match="not found"):
        Inventory.load("/nonexistent/hosts.toml")


def test_from_hosts_and_select():
    inv = Inventory.from_hosts(
        [Host("node01", groups=("gpu",)), "node02", {"name": "node03", "port": 2200}, Host("web", groups=("gpu",))],
        user="me",
    )
    assert [h.user for h in inv] == ["me"] * 4
    assert inv["node03"].port == 2200
    assert [h.name for h in inv.select("gpu")] == ["node01", "web"]
    assert [h.name for h in inv.select("node0*")] == ["node01", "node02", "node03"]
    assert [h.name for h in inv.select("web,node02")] == ["node02", "web"]  # inventory order
    with pytest.raises(InventoryError, match="did you mean 'node01'"):
        inv.select("node1")
    with pytest.raises(InventoryError, match="'port'"):
        Inventory.from_hosts([{"name": "x", "port": "22"}])
