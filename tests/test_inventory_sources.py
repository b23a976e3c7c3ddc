"""Host ranges and node sets, the inventories users already have (~/.ssh/config, Ansible),
and the repository's inventory/ folder: parsed, converted to TOML, and used on the lab."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sshjobs import Host, Inventory, InventoryError
from sshjobs.errors import ConnectionRefused
from sshjobs.sources import ansible_inventory_command

ROOT = Path(__file__).resolve().parent.parent


def sshjobs(*args, env=None, timeout=180) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "SSHJOBS_INVENTORY"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "sshjobs", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def load_text(tmp_path: Path, text: str, name: str = "hosts.toml") -> Inventory:
    path = tmp_path / name
    path.write_text(text)
    return Inventory.load(path)


# -- 1. host ranges and node sets ---------------------------------------------------------------
def test_a_host_table_whose_name_holds_a_range_is_one_host_per_value(tmp_path):
    inv = load_text(tmp_path, """
[defaults]
port = 2222

[hosts."node[01-10]"]
address = "10.0.0.[11-20]"
user = "lab[1-10]"
workdir = "~/.cache/sshjobs"
groups = ["rack1"]

[hosts.web]
""")
    assert [h.name for h in inv] == [f"node{i:02d}" for i in range(1, 11)] + ["web"]
    assert [(h.address, h.user) for h in inv][:10] == [(f"10.0.0.{10 + i}", f"lab{i}") for i in range(1, 11)]
    assert {(h.port, h.workdir, h.groups) for h in inv.hosts[:10]} == {(2222, "~/.cache/sshjobs", ("rack1",))}
    assert inv["web"].address == "web" and inv["web"].user is None


def test_a_range_of_another_length_is_an_error_naming_the_table_and_the_key(tmp_path):
    with pytest.raises(InventoryError) as info:
        load_text(tmp_path, '[hosts."node[01-10]"]\naddress = "10.0.0.[11-20]"\nuser = "lab[1-5]"\n')
    assert str(info.value).startswith(f'{tmp_path / "hosts.toml"}: [hosts."node[01-10]"]: \'user\' = \'lab[1-5]\'')
    assert "holds 5 values but the table name 10" in str(info.value)
    with pytest.raises(InventoryError, match=r"\[hosts.web\]: 'address' = '10.0.0.\[1-2\]' holds 2 values"):
        load_text(tmp_path, '[hosts.web]\naddress = "10.0.0.[1-2]"\n')
    with pytest.raises(InventoryError, match=r"\[defaults\]: 'user' = 'lab\[1-3\]': a range expands only in a host table"):
        load_text(tmp_path, '[defaults]\nuser = "lab[1-3]"\n[hosts."n[1-3]"]\n')
    with pytest.raises(InventoryError, match=r"host 'node02' is listed twice"):
        load_text(tmp_path, '[hosts."node[01-03]"]\n[hosts.node02]\n')
    with pytest.raises(InventoryError, match=r'\[hosts."node\[03-01\]"\]: not a node set'):
        load_text(tmp_path, '[hosts."node[03-01]"]\n')


NODESET_INV = Inventory.from_hosts([*(Host(f"node{i:02d}") for i in range(1, 11)), Host("gpu01", groups=("gpu",)),
                                    Host("web", groups=("gpu",))])


@pytest.mark.parametrize("selection, names", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[01-10]", [f"node{i:02d}" for i in range(1, 11)]),
    ("gpu", ["gpu01", "web"]),
    ("@gpu", ["gpu01", "web"]),
    ("node0*", [f"node0{i}" for i in range(1, 10)]),
    ("node0[1,2]", ["node01", "node02"]),  # not split at its comma
    ("node[09-10],gpu,node0[1,2]", ["node01", "node02", "node09", "node10", "gpu01", "web"]),
    ("node[01-10]!node[02-09]", ["node01", "node10"]),
    (["node[01-02]", "web"], ["node01", "node02", "web"]),
])
def test_select_takes_node_sets_groups_globs_and_lists_of_them(selection, names):
    assert [h.name for h in NODESET_INV.select(selection)] == names


def test_a_node_set_naming_hosts_the_inventory_lacks_is_an_error():
    with pytest.raises(InventoryError, match=r"--limit 'node\[09-12\]': node\[11-12\] not in the inventory"):
        NODESET_INV.select("node[09-12]")
    with pytest.raises(InventoryError, match=r"--limit 'node\[11-12\]' matches no host or group"):
        NODESET_INV.select("node[11-12]")


def test_from_hosts_takes_node_sets():
    inv = Inventory.from_hosts("node[01-03,07]", user="me")
    assert [(h.name, h.user) for h in inv] == [("node01", "me"), ("node02", "me"), ("node03", "me"), ("node07", "me")]
    inv = Inventory.from_hosts(["web", "db[1-2]", {"name": "gpu[1-2]", "address": "10.1.0.[5-6]", "port": 2200}])
    assert [(h.name, h.address, h.port) for h in inv] == [
        ("web", "web", None), ("db1", "db1", None), ("db2", "db2", None),
        ("gpu1", "10.1.0.5", 2200), ("gpu2", "10.1.0.6", 2200)]
    with pytest.raises(InventoryError, match="'address' = '10.1.0.\\[5-7\\]' holds 3 values but the table name 2"):
        Inventory.from_hosts([{"name": "gpu[1-2]", "address": "10.1.0.[5-7]"}])


def test_limit_takes_node_sets_on_the_command_line(lab, jobs_file):
    inv = str(lab.inventory_path)
    p = sshjobs("inventory", "-i", inv, "--limit", "node[01-03,07],node1*", "--json")
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["host"] for line in p.stdout.splitlines()] == ["node01", "node02", "node03", "node07",
                                                                            "node10"]
    p = sshjobs("run", "-i", inv, "--limit", "node0[4,5]", f"{jobs_file}:whoami", "--json")
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["value"] for line in p.stdout.splitlines()] == [lab.hosts[3].user, lab.hosts[4].user]
    bad = sshjobs("inventory", "-i", inv, "--limit", "node[09-12]")
    assert bad.returncode == 2 and "--limit 'node[09-12]': node[11-12] not in the inventory" in bad.stderr


@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "sourcejobs.py"
    path.write_text("import getpass, os\n\ndef whoami():\n    return getpass.getuser()\n\n"
                    "def connection():\n    return os.environ.get('SSH_CONNECTION', '')\n")
    return path


def test_toml_folds_runs_of_hosts_back_into_node_sets_and_loads_back(tmp_path):
    inv = Inventory.from_hosts([*({"name": f"node{i:02d}", "address": f"10.0.0.{10 + i}", "user": f"lab{i}"}
                                  for i in range(1, 11)),
                                {"name": "node11", "address": "10.9.9.9", "user": "other"}, "web"], port=2222)
    text = inv.to_toml()
    assert '[hosts."node[01-10]"]\naddress = "10.0.0.[11-20]"\nuser = "lab[1-10]"\n' in text
    assert "[defaults]\nport = 2222\n" in text
    back = load_text(tmp_path, text)
    assert back.hosts == inv.hosts


# -- 2. ~/.ssh/config ---------------------------------------------------------------------------
def ssh_config_for_lab(lab, path: Path) -> Path:
    """A jump host (lab node01), a host behind it (node02), a plain one (node03), and
    entries that are patterns, not hosts."""
    h = lab.hosts
    common = f"    IdentityFile {lab.identity}\n    UserKnownHostsFile {lab.known_hosts}\n"
    path.write_text(
        f"# the lab, as a user would write it\n"
        f"Host jump\n    HostName {h[0].address}\n    Port {h[0].port}\n    User {h[0].user}\n{common}\n"
        f"Host inner\n    HostName {h[1].address}\n    Port {h[1].port}\n    User {h[1].user}\n"
        f"    ProxyJump jump\n{common}\n"
        f"Host plain\n    HostName {h[2].address}\n    Port {h[2].port}\n{common}\n"
        f"Host plain\n    User {h[2].user}\n    User ignored-as-openssh-takes-the-first\n\n"
        f"Host *.wild !never\n    User nobody\n")
    path.chmod(0o600)
    return path


def ssh_G(path: Path, alias: str) -> dict[str, list[str]]:
    out = subprocess.run(["ssh", "-G", "-F", str(path), alias], capture_output=True, text=True, check=True).stdout
    opts: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        opts.setdefault(key, []).append(value)
    return opts


def test_from_ssh_config_resolves_each_host_entry_as_openssh_does(lab, tmp_path):
    config = ssh_config_for_lab(lab, tmp_path / "config")
    inv = Inventory.from_ssh_config(path=config)
    assert [h.name for h in inv] == ["jump", "inner", "plain"]  # no wildcard entries
    for h in inv:
        openssh = ssh_G(config, h.name)
        assert (h.address, h.user, str(h.port)) == (openssh["hostname"][0], openssh["user"][0], openssh["port"][0])
        assert h.identity in [os.path.expanduser(p) for p in openssh["identityfile"]]
        assert h.proxy_jump == openssh.get("proxyjump", [None])[0]
        assert h.known_hosts == os.path.expanduser(openssh["userknownhostsfile"][0])
        assert h.ssh_config == str(config)
    assert [h.name for h in Inventory.from_ssh_config("in*,!jump", path=config)] == ["inner"]
    with pytest.raises(InventoryError, match="no Host entry matches 'db'"):
        Inventory.from_ssh_config("db", path=config)
    with pytest.raises(InventoryError, match="ssh config file not found"):
        Inventory.from_ssh_config(path=tmp_path / "missing")


def test_from_ssh_config_says_what_it_leaves_out(tmp_path):
    config = tmp_path / "config"
    config.write_text(f"Include {tmp_path / 'more.conf'}\nHost one two\n    HostName 10.0.0.1\n"
                      "Host proxied\n    HostName 10.0.0.2\n    ProxyCommand ssh -W %h:%p gate\n")
    (tmp_path / "more.conf").write_text("Host included\n    HostName 10.0.0.3\n    User inc\n")
    inv = Inventory.from_ssh_config(path=config)
    assert [(h.name, h.address, h.user) for h in inv] == [("included", "10.0.0.3", "inc"), ("one", "10.0.0.1", None),
                                                          ("proxied", "10.0.0.2", None)]
    assert inv.notes == ["two: the same host as one, left out",
                         "proxied: its ProxyCommand is not carried over (proxy_jump is): it is reached directly"]


def owner_of_local_port(port: int) -> str:
    """The process (name, pid) that holds 127.0.0.1:<port> (ss, as root)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip()


def test_gather_through_a_proxy_jump_from_ssh_config(lab, tmp_path, jobs_file):
    """node02 ('inner') is reached through node01 ('jump'): while connected, the TCP
    connection that node02's sshd sees comes from node01's sshd, not from this process."""
    if os.geteuid() != 0:
        pytest.skip("needs root: ss shows other users' sockets")
    config = ssh_config_for_lab(lab, tmp_path / "config")
    inv = Inventory.from_ssh_config("inner,plain", path=config)

    async def connected_from():
        async with inv.connect() as cluster:
            results = await cluster.gather(lambda: os.environ["SSH_CONNECTION"])
            return [(r.value, owner_of_local_port(int(r.value.split()[1]))) for r in results]

    (inner_conn, inner_owner), (plain_conn, plain_owner) = asyncio.run(connected_from())
    assert inner_conn.split()[2] == lab.hosts[1].address and plain_conn.split()[2] == lab.hosts[2].address
    assert '"sshd"' in inner_owner and f"pid={os.getpid()}," not in inner_owner, inner_owner
    assert f"pid={os.getpid()}," in plain_owner, plain_owner  # the direct one is this process's own
    assert [r.value for r in inv.gather(lambda: __import__("getpass").getuser())] == [lab.hosts[1].user,
                                                                                      lab.hosts[2].user]


def test_errors_for_a_host_reached_through_an_alias_name_the_resolved_target(lab, tmp_path):
    config = tmp_path / "config"
    config.write_text(f"Host gone\n    HostName {lab.hosts[0].address}\n    Port 1\n    User someone\n"
                      f"Host gonejump\n    HostName 127.0.0.1\n    Port 1\n    User other\n    ProxyJump gone\n")
    inv = load_text(tmp_path, f'[defaults]\nssh_config = "{config}"\nconnect_timeout = 5\n'
                              f'[hosts.gone]\n[hosts.behind]\naddress = "gonejump"\n')
    assert inv["gone"].target == f"someone@{lab.hosts[0].address}:1"
    results = inv.gather(lambda: 1)
    assert all(isinstance(r.error, ConnectionRefused) for r in results), results
    assert results[0].error.message == f"someone@{lab.hosts[0].address}:1: connection refused"
    assert results[1].error.message == "other@127.0.0.1:1 via gone: connection refused"


def test_the_inventory_command_shows_the_resolved_user_and_port(lab, tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    inv = tmp_path / "hosts.toml"
    inv.write_text('[hosts.aliased]\n[hosts.plain]\naddress = "127.0.0.1"\n')
    env = {"HOME": str(home), "USER": "root", "LOGNAME": "root"}
    bare = sshjobs("inventory", "-i", inv, env=env)
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.splitlines()[1].split()[:4] == ["aliased", "aliased", "22", "root"]  # today "-"
    (home / ".ssh" / "config").write_text("Host aliased\n    HostName 10.20.30.40\n    User deploy\n    Port 2222\n"
                                          "    ProxyJump bastion\n")
    shown = sshjobs("inventory", "-i", inv, env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:4] == ["host", "address", "port", "user"] and lines[0].split()[-1] == "via"
    assert lines[1].split()[:4] == ["aliased", "10.20.30.40", "2222", "deploy"] and lines[1].split()[-1] == "bastion"
    assert lines[2].split()[:4] == ["plain", "127.0.0.1", "22", "root"]
    rows = [json.loads(line) for line in sshjobs("inventory", "-i", inv, "--json", env=env).stdout.splitlines()]
    assert [(r["address"], r["port"], r["user"], r["proxy_jump"]) for r in rows] == [
        ("10.20.30.40", 2222, "deploy", "bastion"), ("127.0.0.1", 22, "root", None)]


def test_the_inventory_command_imports_no_asyncssh_without_an_ssh_config(tmp_path):
    inv = tmp_path / "hosts.toml"
    inv.write_text('[hosts."node[01-03]"]\naddress = "10.0.0.[1-3]"\n')
    code = ("import sys; sys.argv = ['sshjobs', 'inventory', '-i', %r]\nfrom sshjobs.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('asyncssh' in sys.modules, file=sys.stderr)") % str(inv)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert p.stderr.strip().splitlines()[-1] == "False", p.stderr
    assert "node03" in p.stdout and "10.0.0.3" in p.stdout


def test_from_ssh_config_on_the_command_line_prints_toml_that_loads_back_and_runs(lab, tmp_path, jobs_file,
                                                                                   monkeypatch):
    """With the lab in ~/.ssh/config: `sshjobs inventory --from-ssh-config` prints a TOML
    inventory that loads back to the same hosts, and `sshjobs run` on it goes through the jump."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    config = ssh_config_for_lab(lab, home / ".ssh" / "config")
    env = {"HOME": str(home), "XDG_STATE_HOME": str(tmp_path / "state")}
    p = sshjobs("inventory", "--from-ssh-config", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("# sshjobs inventory: the hosts of ~/.ssh/config, Host *\n")
    saved = tmp_path / "hosts.toml"
    saved.write_text(p.stdout)
    with monkeypatch.context() as m:
        m.setenv("HOME", str(home))
        assert Inventory.load(saved).hosts == Inventory.from_ssh_config().hosts
    assert tomllib.loads(p.stdout)["hosts"]["inner"]["proxy_jump"] == "jump"
    assert "ssh_config" not in tomllib.loads(p.stdout)["hosts"]["inner"]  # the default file
    only = sshjobs("inventory", "--from-ssh-config", "inn*", "--json", env=env)
    assert [json.loads(line)["host"] for line in only.stdout.splitlines()] == ["inner"], only.stderr
    other = sshjobs("inventory", "--from-ssh-config", "plain", "--ssh-config", config, env={"HOME": str(tmp_path)})
    assert tomllib.loads(other.stdout)["defaults"]["ssh_config"] == str(config), other.stderr  # every host's
    ran = sshjobs("run", "-i", saved, "--limit", "inner", f"{jobs_file}:whoami", "--json", env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert json.loads(ran.stdout)["value"] == lab.hosts[1].user


# -- 2. Ansible inventories ------------------------------------------------------------------------
INI = """\
# hosts before any section are "ungrouped"
mail.example.com ansible_user=postmaster

[web]
www[01:50].example.com
web-[a:c].example.com:2222 ansible_user=webadmin  # a range, a port and a host var

[web:vars]
ansible_port=2200
ansible_python_interpreter=/usr/bin/python3

[db]
db[1:9:4] ansible_ssh_private_key_file={key}
db-main ansible_host=10.0.0.7

[prod:children]
web
db

[prod:vars]
ansible_port=2300
ansible_user=deploy
ansible_ssh_common_args='-o UserKnownHostsFile={kh} -J bastion'
"""

YAML = """\
all:
  hosts:
    mail.example.com:
      ansible_user: postmaster
  children:
    prod:
      vars:
        ansible_port: 2300
        ansible_user: deploy
        ansible_ssh_common_args: -o UserKnownHostsFile={kh} -J bastion
      children:
        web:
          hosts:
            www[01:50].example.com:
            web-[a:c].example.com:2222:
              ansible_user: webadmin
          vars:
            ansible_port: 2200
            ansible_python_interpreter: /usr/bin/python3
        db:
          hosts:
            db[1:9:4]:
              ansible_ssh_private_key_file: {key}
            db-main:
              ansible_host: 10.0.0.7
"""

READERS = ["builtin", pytest.param("ansible-inventory", marks=pytest.mark.skipif(
    ansible_inventory_command() is None, reason="ansible-core is not installed"))]


@pytest.fixture
def ansible_files(tmp_path):
    key = tmp_path / "id_test"
    key.write_text("not really a key")
    files = {}
    for name, text in (("hosts.ini", INI), ("hosts.yml", YAML)):
        files[name] = tmp_path / name
        files[name].write_text(text.format(key=key, kh=tmp_path / "known_hosts"))
    return files, key, tmp_path / "known_hosts"


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", ["hosts.ini", "hosts.yml"])
def test_from_ansible_reads_groups_children_vars_and_ranges(ansible_files, name, reader):
    files, key, kh = ansible_files
    inv = Inventory.from_ansible(files[name], reader=reader)
    names = [h.name for h in inv]
    assert names == (["mail.example.com"] + [f"www{i:02d}.example.com" for i in range(1, 51)]
                     + ["web-a.example.com", "web-b.example.com", "web-c.example.com", "db1", "db5", "db9", "db-main"])
    mail, www01, web_b, db5 = inv["mail.example.com"], inv["www01.example.com"], inv["web-b.example.com"], inv["db5"]
    assert (mail.user, mail.port, mail.groups, mail.proxy_jump) == ("postmaster", None, (), None)
    # web's own vars win over its parent prod's (a deeper group), the host's over both
    assert (www01.user, www01.port, www01.python) == ("deploy", 2200, "/usr/bin/python3")
    assert (web_b.user, web_b.port) == ("webadmin", 2222)
    assert (www01.groups, db5.groups) == (("prod", "web"), ("prod", "db"))
    assert (db5.address, db5.port, db5.identity, db5.python) == ("db5", 2300, str(key), "python3")
    assert (db5.known_hosts, db5.proxy_jump) == (str(kh), "bastion")
    assert (inv["db-main"].address, inv["db-main"].identity) == ("10.0.0.7", None)
    assert [h.name for h in inv.select("db")] == ["db1", "db5", "db9", "db-main"]
    assert len(inv.select("prod")) == 57


def test_the_builtin_reader_agrees_with_ansible_inventory(ansible_files):
    if ansible_inventory_command() is None:
        pytest.skip("ansible-core is not installed")
    files, _, _ = ansible_files
    for path in files.values():
        assert Inventory.from_ansible(path, reader="builtin").hosts == Inventory.from_ansible(
            path, reader="ansible-inventory").hosts


def test_from_ansible_errors_name_the_file_and_the_line(tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[web]\nwww[01:5].example.com\n")
    with pytest.raises(InventoryError, match=r"bad.ini:2: host range must have begin and end of equal width"):
        Inventory.from_ansible(bad, reader="builtin")
    bad.write_text("[web:children]\nnowhere\n")
    with pytest.raises(InventoryError, match=r"bad.ini:2: group 'nowhere' is used but never declared"):
        Inventory.from_ansible(bad, reader="builtin")
    bad.write_text("[web]\nhost ansible_host='{{ lookup(\"env\", \"X\") }}'\n")
    with pytest.raises(InventoryError, match=r"host 'host': ansible_host is a Jinja template"):
        Inventory.from_ansible(bad, reader="builtin")
    bad.write_text("#!/bin/sh\necho '{}'\n")
    with pytest.raises(InventoryError, match="a dynamic inventory needs ansible-inventory"):
        Inventory.from_ansible(bad, reader="builtin")
    with pytest.raises(InventoryError, match="Ansible inventory not found"):
        Inventory.from_ansible(tmp_path / "none.ini")
    local = tmp_path / "local.ini"
    local.write_text("localhost ansible_connection=local\nweb\n"
                     "gated ansible_ssh_common_args='-o ProxyCommand=\"ssh -W %h:%p gate\"'\n")
    inv = Inventory.from_ansible(local, reader="builtin")
    assert [h.name for h in inv] == ["web", "gated"]
    assert inv.notes == ["localhost: ansible_connection=local is not SSH, left out",
                         "gated: its ProxyCommand is not carried over (-J/ProxyJump is): it is reached directly"]


def lab_ansible_inventory(lab, path: Path) -> Path:
    lines = ["[even]"] + [f"{h.name} ansible_host={h.address} ansible_port={h.port} ansible_user={h.user}"
                          for h in lab.hosts[1:6:2]]
    lines += ["[odd]"] + [f"{h.name} ansible_host={h.address} ansible_port={h.port} ansible_user={h.user}"
                          for h in lab.hosts[0:6:2]]
    lines += ["[lab:children]", "even", "odd", "[lab:vars]", f"ansible_ssh_private_key_file={lab.identity}",
              f"ansible_ssh_common_args='-o UserKnownHostsFile={lab.known_hosts}'"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("reader", READERS)
def test_gather_on_the_lab_through_an_ansible_inventory(lab, tmp_path, reader):
    inv = Inventory.from_ansible(lab_ansible_inventory(lab, tmp_path / "lab.ini"), reader=reader,
                                 workdir=lab.hosts[0].workdir)
    assert [h.name for h in inv] == ["node02", "node04", "node06", "node01", "node03", "node05"]
    results = inv.select("odd").gather(lambda: __import__("getpass").getuser())
    assert [(r.host, r.value) for r in results] == [(h.name, h.user) for h in lab.hosts[0:6:2]], results


def test_from_ansible_on_the_command_line_prints_toml_that_loads_back(lab, tmp_path, jobs_file, ansible_files):
    files, _, _ = ansible_files
    for path in files.values():
        p = sshjobs("inventory", "--from-ansible", path)
        assert p.returncode == 0, p.stderr
        assert '[hosts."www[01-50].example.com"]' in p.stdout  # folded back into a node set
        saved = tmp_path / f"{path.name}.toml"
        saved.write_text(p.stdout)
        assert Inventory.load(saved).hosts == Inventory.from_ansible(path).hosts
    p = sshjobs("inventory", "--from-ansible", lab_ansible_inventory(lab, tmp_path / "lab.ini"), "--limit", "lab")
    saved = tmp_path / "lab.toml"
    saved.write_text(p.stdout)
    ran = sshjobs("run", "-i", saved, "--limit", "even", f"{jobs_file}:whoami", "--json",
                  env={"XDG_STATE_HOME": str(tmp_path / "state")})
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert [json.loads(line)["value"] for line in ran.stdout.splitlines()] == [h.user for h in lab.hosts[1:6:2]]
    both = sshjobs("inventory", "--from-ansible", files["hosts.ini"], "--from-ssh-config")
    assert both.returncode == 2 and "give one of --from-ansible and --from-ssh-config" in both.stderr


# -- 5. the inventory/ folder ------------------------------------------------------------------------
def test_the_readme_api_example_loads_the_example_inventory():
    readme = (ROOT / "README.md").read_text("utf-8")
    api = readme[readme.index("## The API"):]
    loaded = re.search(r'Inventory\.load\("([^"]+)"\)', api).group(1)
    assert loaded == "inventory/hosts.toml"
    text = (ROOT / loaded).read_text("utf-8")
    assert text.count("\n# ") > 10  # a commented example
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        inv = Inventory.load(loaded)
    finally:
        os.chdir(cwd)
    assert len(inv) > 1 and inv.select("gpu")
    ignored = subprocess.run(["git", "check-ignore", "-q", loaded], cwd=ROOT)
    assert ignored.returncode == 1, f"{loaded} is ignored by .gitignore"
