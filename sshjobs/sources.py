"""Inventories users already have, read into the inventory's own tables.

``read_ssh_config`` turns the ``Host`` entries of an ssh_config file into host tables, each
resolved by asyncssh's own ssh_config parser (the one ``asyncssh.connect`` reads): HostName,
User, Port, IdentityFile, ProxyJump and UserKnownHostsFile.  ``ssh_options`` is the same
resolution for one address, so that a host reached through an alias can be shown and named
in errors as the connection reaches it.  asyncssh is imported only by these two.

``read_ansible`` turns an Ansible inventory into host tables: through ``ansible-inventory
-i FILE --list`` when ansible-core is installed (Ansible's own semantics, dynamic
inventories and plugins too), else through a reader of Ansible's INI and YAML formats
that follows the same rules (groups, ``children``, ``:vars``, ``host:port``, ranges such as
``www[01:50].example.com``, variable precedence by group depth).

Both return ``(data, notes)``: ``data`` is what ``BaseInventory.from_dict`` takes (a
``hosts`` table of host tables), ``notes`` lines about what was left out.  Imports nothing
of sshjobs but errors, so the inventory (one floor up) builds its hosts from them.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from .errors import InventoryError

# (ast, shutil, string and subprocess are imported where the Ansible reader needs them: every
# command imports this module with the inventory)

DEFAULT_SSH_CONFIG = "~/.ssh/config"


# -- ~/.ssh/config ------------------------------------------------------------------------
def ssh_config_paths(path: str | os.PathLike | None = None) -> list[Path]:
    """The files asyncssh reads for a connection: ``path``, else ~/.ssh/config when readable."""
    if path is not None:
        return [Path(os.path.expanduser(path))]
    default = Path(os.path.expanduser(DEFAULT_SSH_CONFIG))
    return [default] if os.access(default, os.R_OK) else []


def ssh_options(address: str, user: str | None = None, port: int | None = None,
                path: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the ssh_config file says for connecting to ``address`` (an explicit ``user`` or
    ``port`` wins over it, as with asyncssh.connect); {} without a file to read."""
    paths = ssh_config_paths(path)
    if not paths:
        return {}
    from asyncssh.config import ConfigParseError, SSHClientConfig

    try:
        config = SSHClientConfig.load(None, paths, False, False, False, getpass.getuser(),
                                      user or (), address, port or ())
    except (OSError, ConfigParseError) as exc:
        raise InventoryError(f"{paths[0]}: cannot read the ssh config: {exc}") from None
    return {key: config.get(key) for key in ("Hostname", "User", "Port", "IdentityFile", "ProxyJump",
                                             "UserKnownHostsFile", "ProxyCommand") if config.get(key) is not None}


def ssh_config_aliases(path: Path, _seen: set | None = None) -> list[str]:
    """The names of ``Host`` lines, in file order (Include'd files where they are included),
    leaving out patterns (``*``, ``?``) and negations (``!name``)."""
    seen = _seen if _seen is not None else set()
    if path in seen:
        return []
    seen.add(path)
    names: list[str] = []
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read the ssh config: {exc.strerror or exc}") from None
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line.replace("=", " ", 1) if re.match(r"^\w+\s*=", line) else line)
        except ValueError as exc:
            raise InventoryError(f"{path} line {lineno}: {exc}") from None
        keyword, args = words[0].lower(), words[1:]
        if keyword == "host":
            names += [a for arg in args for a in arg.split(",") if a and not set(a) & set("*?!")]
        elif keyword == "include":
            for pattern in args:  # as asyncssh's Include: relative to ~/.ssh, globbed, sorted by glob
                full = Path(pattern).expanduser()
                folder = Path(full.anchor) if full.anchor else Path(os.path.expanduser("~/.ssh"))
                rel = str(Path(*full.parts[1:])) if full.anchor else pattern
                for included in folder.glob(rel):
                    if included.is_file():
                        names += ssh_config_aliases(included, seen)
    return list(dict.fromkeys(names))


def read_ssh_config(pattern: str = "*", path: str | os.PathLike = DEFAULT_SSH_CONFIG) -> tuple[dict, list[str]]:
    """One host table per ``Host`` name matching ``pattern`` (an ssh_config pattern list:
    ``web*,!web3``), resolved as asyncssh resolves it for a connection."""
    config = Path(os.path.expanduser(path))
    if not config.is_file():
        raise InventoryError(f"{config}: ssh config file not found")
    from asyncssh.pattern import WildcardPatternList

    wanted = WildcardPatternList(pattern)
    explicit = Path(os.path.expanduser(DEFAULT_SSH_CONFIG)) != config
    hosts: dict[str, dict] = {}
    notes: list[str] = []
    reached: dict[tuple, str] = {}
    for alias in ssh_config_aliases(config):
        if not wanted.matches(alias):
            continue
        opts = ssh_options(alias, path=config)
        table: dict[str, Any] = {"address": opts.get("Hostname", alias)}
        if "User" in opts:
            table["user"] = opts["User"]
        if "Port" in opts:
            table["port"] = opts["Port"]
        keys = [os.path.expanduser(k) for k in opts.get("IdentityFile", [])]
        present = [k for k in keys if os.path.isfile(k)]
        if present:
            table["identity"] = present[0]
        jump = opts.get("ProxyJump")
        if jump and jump.lower() != "none":
            table["proxy_jump"] = jump
        known = opts.get("UserKnownHostsFile")
        if known == []:  # "UserKnownHostsFile none": asyncssh checks no host key
            table["host_key_checking"] = False
        elif known:
            table["known_hosts"] = os.path.expanduser(known[0])
        if explicit:
            table["ssh_config"] = str(config)
        if opts.get("ProxyCommand") and "proxy_jump" not in table:
            notes.append(f"{alias}: its ProxyCommand is not carried over (proxy_jump is): it is reached directly")
        key = (table.get("user"), table["address"], table.get("port"), table.get("proxy_jump"))
        if key in reached:  # `Host a b`: two names for one host
            notes.append(f"{alias}: the same host as {reached[key]}, left out")
            continue
        reached[key] = alias
        hosts[alias] = table
    if not hosts:
        raise InventoryError(f"{config}: no Host entry matches {pattern!r} (wildcard entries are left out)")
    return {"hosts": hosts}, notes


# -- Ansible inventories ----------------------------------------------------------------------
_SSH_CONNECTIONS = {"ssh", "smart", "paramiko", "paramiko_ssh", "ansible.builtin.ssh", "ansible.builtin.paramiko_ssh"}


def ansible_inventory_command() -> str | None:
    """``ansible-inventory`` on PATH or beside this interpreter (an unactivated virtualenv)."""
    import shutil

    beside = Path(sys.executable).parent / "ansible-inventory"
    return shutil.which("ansible-inventory") or (str(beside) if os.access(beside, os.X_OK) else None)


def read_ansible(path: str | os.PathLike, reader: str = "auto") -> tuple[dict, list[str]]:
    """Host tables from an Ansible inventory.  ``reader``: "auto" (``ansible-inventory`` when
    installed, else the built-in reader), "ansible-inventory" or "builtin"."""
    path = Path(path)
    if reader not in ("auto", "ansible-inventory", "builtin"):
        raise InventoryError(f"reader must be 'auto', 'ansible-inventory' or 'builtin', not {reader!r}")
    if not path.exists():
        raise InventoryError(f"{path}: Ansible inventory not found")
    command = ansible_inventory_command() if reader != "builtin" else None
    if reader == "ansible-inventory" and command is None:
        raise InventoryError(f"{path}: ansible-inventory not found (pip install ansible-core)")
    if command:
        groups, hostvars, order = _from_ansible_inventory(command, path)
    else:
        groups, hostvars, order = _builtin(path)
    return _host_tables(path, groups, hostvars, order)


def _from_ansible_inventory(command: str, path: Path) -> tuple[dict, dict, list[str]]:
    import subprocess

    env = {**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1", "ANSIBLE_NOCOLOR": "1"}
    try:
        done = subprocess.run([command, "-i", str(path), "--list"], capture_output=True, text=True,
                              env=env, stdin=subprocess.DEVNULL, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InventoryError(f"{path}: ansible-inventory failed: {exc}") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("<<<")]
        raise InventoryError(f"{path}: ansible-inventory failed:\n" + "\n".join(lines[-12:]))
    try:
        data = json.loads(done.stdout)
    except ValueError as exc:
        raise InventoryError(f"{path}: ansible-inventory printed no JSON: {exc}") from None
    hostvars = data.pop("_meta", {}).get("hostvars", {})
    groups = {name: {"hosts": list(g.get("hosts", [])), "children": list(g.get("children", []))}
              for name, g in data.items()}
    return groups, hostvars, _walk(groups)[0]


def _walk(groups: dict) -> tuple[list[str], dict[str, list[str]]]:
    """Hosts in the order Ansible lists them (from ``all``, each group's hosts, then its
    children, depth first) and each host's groups (ancestors too) in the same order."""
    order: list[str] = []
    member: dict[str, list[str]] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path or name not in groups:
            return
        path = (*path, name)
        for host in groups[name].get("hosts", []):
            if host not in member:
                order.append(host)
                member[host] = []
            for g in path:
                if g not in ("all", "ungrouped") and g not in member[host]:
                    member[host].append(g)
        for child in groups[name].get("children", []):
            visit(child, path)

    visit("all", ())
    return order, member


def _builtin(path: Path) -> tuple[dict, dict, list[str]]:
    if path.is_dir():
        raise InventoryError(f"{path}: an inventory folder needs ansible-inventory (pip install ansible-core)")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{path}: cannot read the inventory: {exc}") from None
    if text.startswith("#!"):
        raise InventoryError(f"{path}: a dynamic inventory needs ansible-inventory (pip install ansible-core)")
    model = _AnsibleModel(path)
    if path.suffix in (".yml", ".yaml", ".json") or _looks_like_yaml(text):
        model.read_yaml(text)
    else:
        model.read_ini(text)
    return model.finish()


def _looks_like_yaml(text: str) -> bool:
    first = next((ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", ";"))), "")
    return bool(re.fullmatch(r"[\w.-]+:\s*(#.*)?", first.strip()) or first.strip() == "---")


def expand_ansible_range(pattern: str) -> list[str]:
    """Ansible's host ranges: ``www[01:50].example.com``, ``db-[a:f]``, ``[1:9:2]`` (step);
    a leading zero keeps the width; several ranges in one name multiply."""
    import string

    if "[" not in pattern:
        return [pattern]
    head, _, rest = pattern.partition("[")
    body, sep, tail = rest.partition("]")
    bounds = body.split(":")
    if not sep or len(bounds) not in (2, 3) or not bounds[1]:
        raise ValueError(f"host range must be [begin:end] or [begin:end:step], got {pattern!r}")
    beg, end = bounds[0] or "0", bounds[1]
    step = int(bounds[2]) if len(bounds) == 3 else 1
    if beg in string.ascii_letters and end in string.ascii_letters:
        i, j = string.ascii_letters.index(beg), string.ascii_letters.index(end)
        if i > j:
            raise ValueError(f"host range must have begin <= end, got {pattern!r}")
        values = list(string.ascii_letters[i:j + 1:step])
    else:
        if not (beg.isdigit() and end.isdigit()):
            raise ValueError(f"host range bounds must be numbers or letters, got {pattern!r}")
        width = len(beg) if beg[0] == "0" and len(beg) > 1 else 0
        if width and width != len(end):
            raise ValueError(f"host range must have begin and end of equal width, got {pattern!r}")
        values = [str(n).zfill(width) for n in range(int(beg), int(end) + 1, step)]
    return [name for v in values for name in expand_ansible_range(f"{head}{v}{tail}")]


_HOSTPORT = re.compile(r"^((?:[^:\[\]]|\[[^\]]*\])*):([0-9]+)$")


def _host_pattern(pattern: str) -> tuple[list[str], int | None]:
    """``name``, ``name:port``, ``[v6]:port``; then the name's ranges expanded."""
    port = None
    m = re.fullmatch(r"\[(.+)\]:([0-9]+)", pattern) or _HOSTPORT.match(pattern)
    if m:
        pattern, port = m.group(1), int(m.group(2))
    return expand_ansible_range(pattern), port


def _ini_value(text: str) -> Any:
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


class _AnsibleModel:
    """Groups, their hosts, children and vars, and the hosts' own vars, as Ansible builds them."""

    def __init__(self, path: Path):
        self.path = path
        self.groups: dict[str, dict] = {}
        self.host_vars: dict[str, dict] = {}
        self.parents: dict[str, set[str]] = {}
        self.group("all")
        self.group("ungrouped")

    def error(self, message: str, lineno: int | None = None):
        where = f"{self.path}:{lineno}" if lineno else str(self.path)
        return InventoryError(f"{where}: {message}")

    def group(self, name: str) -> dict:
        if name not in self.groups:
            self.groups[name] = {"hosts": [], "children": [], "vars": {}}
            self.parents[name] = set()
        return self.groups[name]

    def add_hosts(self, pattern: str, variables: dict, group: str, lineno: int | None = None) -> None:
        try:
            names, port = _host_pattern(str(pattern))
        except ValueError as exc:
            raise self.error(str(exc), lineno) from None
        for name in names:
            if name not in self.groups[group]["hosts"]:
                self.groups[group]["hosts"].append(name)
            own = self.host_vars.setdefault(name, {})
            own.update(variables)
            if port is not None:
                own["ansible_port"] = port

    def add_child(self, parent: str, child: str) -> None:
        self.group(child)
        if child not in self.groups[parent]["children"]:
            self.groups[parent]["children"].append(child)
        self.parents[child].add(parent)

    # -- INI --------------------------------------------------------------------------------
    def read_ini(self, text: str) -> None:
        section = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:[#;].*)?$")
        group, state = "ungrouped", "hosts"
        pending: dict[str, int] = {}  # children named before their group: line where first named
        declared = {"all", "ungrouped"}
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            m = section.match(line)
            if m:
                group, state = m.group(1), m.group(2) or "hosts"
                if state not in ("hosts", "children", "vars"):
                    raise self.error(f"section [{group}:{state}] has unknown type: {state}", lineno)
                self.group(group)
                if state != "vars":
                    declared.add(group)
                    pending.pop(group, None)
                elif group not in declared:
                    pending.setdefault(group, lineno)
                continue
            if line.startswith("["):
                raise self.error(f"invalid section entry: {line!r}", lineno)
            if state == "hosts":
                try:
                    words = shlex.split(line, comments=True)
                except ValueError as exc:
                    raise self.error(f"cannot parse the host line {line!r}: {exc}", lineno) from None
                variables = {}
                for word in words[1:]:
                    key, eq, value = word.partition("=")
                    if not eq:
                        raise self.error(f"expected key=value after the host, got {word!r}", lineno)
                    variables[key] = _ini_value(value)
                self.add_hosts(words[0], variables, group, lineno)
            elif state == "vars":
                key, eq, value = line.partition("=")
                if not eq:
                    raise self.error(f"expected key=value, got {line!r}", lineno)
                self.groups[group]["vars"][key.strip()] = _ini_value(value.strip())
            else:
                child = re.match(r"^([^:\]\s]+)\s*(?:#.*)?$", line)
                if not child:
                    raise self.error(f"expected a group name, got {line!r}", lineno)
                if child.group(1) not in declared:
                    pending.setdefault(child.group(1), lineno)
                self.add_child(group, child.group(1))
        for name, lineno in pending.items():
            if name not in declared:
                raise self.error(f"group {name!r} is used but never declared", lineno)

    # -- YAML -------------------------------------------------------------------------------
    def read_yaml(self, text: str) -> None:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise self.error(f"YAML syntax error: {exc}") from None
        if not isinstance(data, dict) or not data:
            raise self.error("a YAML inventory is a mapping of groups (all: {hosts: ..., children: ...})")
        if "plugin" in data:
            raise self.error("an inventory plugin's configuration needs ansible-inventory (pip install ansible-core)")
        for name, body in data.items():
            self.yaml_group(str(name), body)

    def yaml_group(self, name: str, body: Any) -> None:
        self.group(name)
        if body is None:
            return
        if not isinstance(body, dict):
            raise self.error(f"group {name!r}: expected a mapping of hosts, vars and children, got {body!r}")
        for section, value in body.items():
            if isinstance(value, str):
                value = {value: None}
            if value is None:
                continue
            if section not in ("hosts", "vars", "children") or not isinstance(value, dict):
                raise self.error(f"group {name!r}: {section!r} must be one of hosts, vars, children, each a mapping")
            if section == "vars":
                self.groups[name]["vars"].update(value)
            elif section == "children":
                for child, child_body in value.items():
                    self.yaml_group(str(child), child_body)
                    self.add_child(name, str(child))
            else:
                for pattern, variables in value.items():
                    if variables is not None and not isinstance(variables, dict):
                        raise self.error(f"host {pattern!r}: its variables must be a mapping, got {variables!r}")
                    self.add_hosts(str(pattern), variables or {}, name)

    # -- as ansible-inventory --list shows it ---------------------------------------------------
    def finish(self) -> tuple[dict, dict, list[str]]:
        """Every group without a parent is a child of ``all``; a host in no group but ``all``
        is in ``ungrouped``; each host's variables merged as Ansible merges them: groups by
        depth (then ansible_group_priority, then name), the host's own last."""
        for name in self.groups:
            if name != "all" and not self.parents[name]:
                self.add_child("all", name)
        grouped = {h for n, g in self.groups.items() if n not in ("all", "ungrouped") for h in g["hosts"]}
        ungrouped = self.groups["ungrouped"]["hosts"]
        ungrouped += [h for h in self.groups["all"]["hosts"] if h not in grouped and h not in ungrouped]
        ungrouped[:] = [h for h in ungrouped if h not in grouped]  # a host in a group is not "ungrouped"
        self.groups["all"]["hosts"] = []
        # "ungrouped" first among all's children, as Ansible lists it
        children = self.groups["all"]["children"]
        children.sort(key=lambda n: n != "ungrouped")
        depth: dict[str, int] = {}

        def depth_of(name: str, seen: tuple = ()) -> int:
            if name not in depth:
                if name in seen:
                    raise self.error(f"group {name!r} is its own ancestor")
                depth[name] = max((depth_of(p, (*seen, name)) + 1 for p in self.parents[name]), default=0)
            return depth[name]

        order, member = _walk(self.groups)
        hostvars: dict[str, dict] = {}
        for host in order:
            chain = ["all", *member[host]]
            if host in self.groups["ungrouped"]["hosts"]:
                chain.append("ungrouped")

            def rank(g: str) -> tuple:
                priority = self.groups[g]["vars"].get("ansible_group_priority", 1)
                return depth_of(g), int(priority) if str(priority).lstrip("-").isdigit() else 1, g

            merged: dict = {}
            for g in sorted(set(chain), key=rank):
                merged.update(self.groups[g]["vars"])
            merged.update(self.host_vars.get(host, {}))
            hostvars[host] = merged
        groups = {n: {"hosts": g["hosts"], "children": g["children"]} for n, g in self.groups.items()}
        return groups, hostvars, order


def _ssh_args(text: str) -> dict[str, str]:
    """ProxyJump, UserKnownHostsFile and StrictHostKeyChecking from ssh command-line options
    (ansible_ssh_common_args, ansible_ssh_extra_args)."""
    found: dict[str, str] = {}
    try:
        words = shlex.split(text)
    except ValueError:
        return found
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if word == "-J" or (word.startswith("-J") and len(word) > 2):
            found["proxyjump"] = nxt if word == "-J" else word[2:]
        option = nxt if word == "-o" else word[2:] if word.startswith("-o") and len(word) > 2 else None
        if option:
            key, _, value = option.replace("=", " ", 1).partition(" ")
            found[key.lower()] = value.strip()
    return found


def _host_tables(path: Path, groups: dict, hostvars: dict, order: list[str]) -> tuple[dict, list[str]]:
    """sshjobs host tables from Ansible's hosts and their merged variables."""
    _, member = _walk(groups)
    hosts: dict[str, dict] = {}
    notes: list[str] = []
    for name in order:
        v = hostvars.get(name, {})

        def var(*keys: str) -> Any:
            for key in keys:
                if v.get(key) not in (None, ""):
                    value = v[key]
                    if isinstance(value, str) and ("{{" in value or "{%" in value):
                        raise InventoryError(f"{path}: host '{name}': {key} is a Jinja template ({value!r});"
                                             " sshjobs reads values, not templates")
                    return value
            return None

        connection = var("ansible_connection")
        if connection is not None and str(connection) not in _SSH_CONNECTIONS:
            notes.append(f"{name}: ansible_connection={connection} is not SSH, left out")
            continue
        table: dict[str, Any] = {}
        address = var("ansible_host", "ansible_ssh_host")
        if address is not None and str(address) != name:
            table["address"] = str(address)
        user = var("ansible_user", "ansible_ssh_user")
        if user is not None:
            table["user"] = str(user)
        port = var("ansible_port", "ansible_ssh_port")
        if port is not None:
            try:
                table["port"] = int(port)
            except (TypeError, ValueError):
                raise InventoryError(f"{path}: host '{name}': ansible_port must be a port number, got {port!r}") from None
        key = var("ansible_ssh_private_key_file", "ansible_private_key_file")
        if key is not None:
            table["identity"] = str(key)
        python = var("ansible_python_interpreter")
        if python is not None and not str(python).startswith("auto"):
            table["python"] = str(python)
        args = _ssh_args(" ".join(str(var(k) or "") for k in ("ansible_ssh_common_args", "ansible_ssh_extra_args")))
        if args.get("proxyjump") and args["proxyjump"].lower() != "none":
            table["proxy_jump"] = args["proxyjump"]
        elif args.get("proxycommand"):
            notes.append(f"{name}: its ProxyCommand is not carried over (-J/ProxyJump is): it is reached directly")
        if args.get("userknownhostsfile"):
            table["known_hosts"] = args["userknownhostsfile"].split()[0]
        checking = args.get("stricthostkeychecking", "").lower()
        flag = var("ansible_host_key_checking", "ansible_ssh_host_key_checking")
        if checking in ("no", "off", "false") or flag in (False, "false", "False", "no"):
            table["host_key_checking"] = False
        elif checking == "accept-new":
            table["host_key_checking"] = "accept-new"
        if member.get(name):
            table["groups"] = list(member[name])
        hosts[name] = table
    if not hosts:
        raise InventoryError(f"{path}: the Ansible inventory has no host reached over SSH")
    return {"hosts": hosts}, notes
