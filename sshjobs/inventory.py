"""The inventory: which hosts to use and how to reach them, from TOML, from code, from
~/.ssh/config or an Ansible inventory (``sources``); node sets (``node[01-10]``) name many
hosts at once, in ClusterShell's notation."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import getpass
import hashlib
import json
import re
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import sources
from .errors import InventoryError


@dataclass(frozen=True)
class Host:
    name: str
    address: str = ""
    user: str | None = None
    port: int | None = None
    identity: str | None = None
    known_hosts: str | None = None
    host_key_checking: bool | str = True  # True, False or "accept-new"
    python: str = "python3"
    slots: int | str = 1  # int >= 1 or "auto"
    connect_timeout: float = 10.0
    keepalive_interval: float = 5.0
    max_sessions: int = 10
    workdir: str = "~/.cache/sshjobs"
    groups: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    offline: bool = False
    safe_results: bool = False
    requirements: tuple[str, ...] = ()  # requirement lines: every call runs in their environment
    preload: tuple[str, ...] = ()  # modules every worker imports as it starts
    proxy_jump: str | None = None  # [user@]host[:port] or an ssh_config alias; comma-separated hops
    ssh_config: str | None = None  # the ssh_config file for this host and its jump hosts (else ~/.ssh/config)

    def __post_init__(self) -> None:
        if not self.address:
            object.__setattr__(self, "address", self.name)

    @functools.cached_property
    def resolved(self) -> "Host":
        """This host as a connection reaches it: what the inventory leaves unset (address
        when it is an alias, user, port, identity, proxy_jump, known_hosts) as the ssh_config
        file (``ssh_config``, else ~/.ssh/config) says for it, then the local user and port
        22.  Reads the file once per Host; asyncssh's parser, imported only when there is one."""
        opts = sources.ssh_options(self.address, self.user, self.port, self.ssh_config)
        keys = [os.path.expanduser(k) for k in opts.get("IdentityFile", [])]
        known = opts.get("UserKnownHostsFile")
        jump = opts.get("ProxyJump")
        return replace(
            self, address=opts.get("Hostname", self.address), user=self.user or opts.get("User") or local_user(),
            port=self.port or opts.get("Port") or 22,
            identity=self.identity or next((k for k in keys if os.path.isfile(k)), None),
            proxy_jump=self.proxy_jump or (jump if jump and jump.lower() != "none" else None),
            known_hosts=self.known_hosts or (os.path.expanduser(known[0]) if known else None))

    @property
    def target(self) -> str:
        """``user@address:port`` as the connection reaches it (see ``resolved``)."""
        try:
            r = self.resolved
        except InventoryError:  # an unreadable ssh config: what the inventory says
            r = replace(self, user=self.user or local_user(), port=self.port or 22)
        address = f"[{r.address}]" if ":" in r.address else r.address
        return f"{r.user}@{address}:{r.port}"


def local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


# key -> (accepted types, description)
_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "address": ((str,), "a host name or IP address"),
    "user": ((str,), "a user name"),
    "port": ((int,), "a port number"),
    "identity": ((str,), "a path to a private key"),
    "known_hosts": ((str,), "a path to a known_hosts file"),
    "host_key_checking": ((bool, str), 'true, false or "accept-new"'),
    "python": ((str,), 'an interpreter name or path, or "match"'),
    "slots": ((int, str), 'a whole number >= 1 or "auto"'),
    "connect_timeout": ((int, float), "seconds"),
    "keepalive_interval": ((int, float), "seconds"),
    "max_sessions": ((int,), "a whole number >= 1"),
    "workdir": ((str,), "a path on the host"),
    "groups": ((list,), "a list of group names"),
    "env": ((dict,), "a table of environment variables"),
    "offline": ((bool,), "true or false"),
    "safe_results": ((bool,), "true or false"),
    "requirements": ((list, str), "a list of requirements or a requirements file's path"),
    "preload": ((list,), "a list of module names"),
    "proxy_jump": ((str,), "a jump host: [user@]host[:port] or an ssh_config alias, comma-separated for several hops"),
    "ssh_config": ((str,), "a path to an ssh_config file"),
}
_HOST_ONLY = {"address", "groups"}
_ADDING = ("env", "requirements", "preload")  # a host's (or group's) adds to the defaults' instead of replacing
_PATH_KEYS = ("identity", "known_hosts", "ssh_config")
# a range in a string value: [1-10], [01-03,07], [1-9/2] (ClusterShell's RangeSet notation)
_RANGE = re.compile(r"\[\s*\d[\d\s,/-]*\]")


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def content_digest(data: bytes) -> str:
    """What tells one content of an inventory file from another (a session serves one)."""
    return hashlib.sha256(data).hexdigest()


class BaseInventory:
    """An ordered set of hosts, parsed and checked; nothing here contacts a host.
    ``sshjobs.Inventory`` adds the verbs that run jobs on them."""

    def __init__(self, hosts: Iterable[Host], source: str | None = None):
        self.hosts: list[Host] = list(hosts)
        self.source = source
        # requirement lines installed through this object (``Inventory.install``): its later
        # calls run in that environment, with each host's own ``requirements``
        self.installed: list[str] = []
        self.notes: list[str] = []  # what a source (Ansible, ssh_config) left out, and why
        # (resolved path, sha256 of its content) of the file it was loaded from: the session
        # (``sshjobs up``) it may use; ``session = False``: never use one
        self.file: tuple[str, str] | None = None
        self.session: bool | None = None

    # -- construction ----------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, session: bool | None = None) -> "BaseInventory":
        """The inventory in a TOML file.  Its calls go through the session that ``sshjobs up``
        started for this file, when one is up with the same content (``session=False``:
        never; they connect anew each time)."""
        path = Path(path)
        where = str(path)
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except FileNotFoundError:
            raise InventoryError(f"{where}: inventory file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InventoryError(f"{where}: cannot read the inventory: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InventoryError(f"{where}: TOML syntax error: {exc}") from None
        inv = cls.from_dict(data, source=where, base=path.resolve().parent)
        inv.file = (os.path.realpath(path), content_digest(raw))
        inv.session = session
        return inv

    @classmethod
    def from_dict(cls, data: dict, source: str = "<inventory>", base: Path | None = None) -> "BaseInventory":
        base = base or Path.cwd()
        unknown = set(data) - {"defaults", "groups", "hosts"}
        for key in sorted(unknown):
            raise InventoryError(f"{source}: unknown top-level key '{key}'"
                                 f"{_did_you_mean(key, ['defaults', 'groups', 'hosts'])}")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict):
            raise InventoryError(f"{source}: [defaults] must be a table")
        _no_ranges(defaults, source, "[defaults]")
        common = _check_table(defaults, source, "[defaults]", base, host_only_ok=False)
        groups_table = data.get("groups", {})
        if not isinstance(groups_table, dict) or not all(isinstance(t, dict) for t in groups_table.values()):
            raise InventoryError(f"{source}: 'groups' must be a table of [groups.NAME] tables")
        for g, t in groups_table.items():
            _no_ranges(t, source, f"[groups.{g}]")
        group_values = {g: _check_table(t, source, f"[groups.{g}]", base, host_only_ok=False)
                        for g, t in groups_table.items()}
        hosts_table = data.get("hosts")
        if not hosts_table:
            raise InventoryError(f"{source}: no hosts: add a [hosts.NAME] table for each host")
        if not isinstance(hosts_table, dict):
            raise InventoryError(f"{source}: 'hosts' must be a table of [hosts.NAME] tables")
        hosts = []
        for title, table in hosts_table.items():
            if not isinstance(table, dict):
                raise InventoryError(f"{source}: host '{title}': expected a table [hosts.{title}], got {_type_name(table)}")
            for name, expanded in expand_table(title, table, f"{source}: {_table_title(title)}"):
                own = _check_table(expanded, source, f"host '{name}'", base, host_only_ok=True)
                member = own.get("groups", common.get("groups", ()))
                layers = [common, *(group_values[g] for g in member if g in group_values), own]
                values: dict[str, Any] = {}
                for layer in layers:  # defaults, then the host's groups in its order, then the host
                    for key, value in layer.items():
                        if key in _ADDING and key in values:
                            value = (tuple({**dict(values[key]), **dict(value)}.items()) if key == "env"
                                     else values[key] + value)
                        values[key] = value
                hosts.append(_make_host(name, values))
        unused = sorted(set(group_values) - {g for h in hosts for g in h.groups})
        if unused:
            raise InventoryError(f"{source}: [groups.{unused[0]}]: no host is in group '{unused[0]}'")
        return cls.from_hosts(hosts, source=source)

    @classmethod
    def from_hosts(cls, hosts: Iterable[Host | str | dict] | str, source: str | None = None,
                   **defaults: Any) -> "BaseInventory":
        """Build an inventory in code: ``Host`` objects, names or node sets (``"node[01-10]"``),
        or dicts of host keys (a node set as ``name``: its string values' ranges expand in
        step); keyword arguments are defaults for every host."""
        where = source or "<inventory>"
        built: list[Host] = []
        for item in [hosts] if isinstance(hosts, str) else hosts:
            if isinstance(item, Host):
                built.append(replace(item, **defaults) if defaults else item)
                continue
            if isinstance(item, str):
                tables = [(name, dict(defaults)) for name in expand_nodeset(item, f"{where}: host {item!r}")]
            elif isinstance(item, dict):
                own = dict(item)
                title = own.pop("name", None) or own.get("address")
                if not title:
                    raise InventoryError(f"{where}: a host needs a name or an address")
                tables = [(n, {**defaults, **t}) for n, t in expand_table(str(title), own, f"{where}: host {title!r}")]
            else:
                raise InventoryError(f"{where}: a host must be a Host, a name or a dict, not {type(item).__name__}")
            for name, values in tables:
                checked = _check_table(values, where, f"host '{name}'", Path.cwd(), host_only_ok=True)
                built.append(_make_host(name, checked))
        if not built:
            raise InventoryError(f"{where}: no hosts")
        seen: dict[tuple, str] = {}
        names: set[str] = set()
        for h in built:
            if h.name in names:
                raise InventoryError(f"{where}: host '{h.name}' is listed twice")
            names.add(h.name)
            key = (h.user, h.address, h.port or 22, h.proxy_jump)
            if key in seen:
                via = f" via {h.proxy_jump}" if h.proxy_jump else ""
                raise InventoryError(
                    f"{where}: host '{h.name}': duplicate address:port {h.address}:{h.port or 22}{via}"
                    f" (already used by host '{seen[key]}')"
                )
            seen[key] = h.name
        return cls(built, source=source)

    @classmethod
    def from_ssh_config(cls, pattern: str = "*", path: str | os.PathLike = "~/.ssh/config",
                        **defaults: Any) -> "BaseInventory":
        """One host per ``Host`` entry of an ssh_config file whose name matches ``pattern``
        (an ssh_config pattern list, ``web*,!web3``; wildcard entries are left out), with
        HostName, User, Port, IdentityFile, ProxyJump and UserKnownHostsFile as asyncssh
        resolves them for a connection; keyword arguments are defaults for every host."""
        data, notes = sources.read_ssh_config(pattern, path)
        return cls._from_source(data, notes, str(path), defaults)

    @classmethod
    def from_ansible(cls, path: str | os.PathLike, *, reader: str = "auto", **defaults: Any) -> "BaseInventory":
        """The hosts of an Ansible inventory (INI or YAML, groups and ``children``;
        ``ansible_host``, ``ansible_user``, ``ansible_port``, ``ansible_ssh_private_key_file``,
        ``ansible_python_interpreter``; ranges such as ``www[01:50].example.com``), each in its
        Ansible groups and their ancestors.  ``reader``: "auto" runs ``ansible-inventory --list``
        when ansible-core is installed (dynamic inventories too), else reads the file itself;
        "ansible-inventory" or "builtin" choose.  Relative key paths resolve against the
        current folder, as Ansible's do; keyword arguments are defaults for every host."""
        data, notes = sources.read_ansible(path, reader)
        return cls._from_source(data, notes, str(path), defaults)

    @classmethod
    def _from_source(cls, data: dict, notes: list[str], source: str, defaults: dict) -> "BaseInventory":
        data = {**data, "defaults": dict(defaults)} if defaults else data
        inv = cls.from_dict(data, source=source, base=Path.cwd())
        inv.notes = notes
        if notes:
            from .log import get_logger

            for note in notes:
                get_logger("sshjobs.inventory").warning(note, source=source)
        return inv

    # -- selection -------------------------------------------------------------------------
    def select(self, selection: str | Iterable[str] | None) -> "BaseInventory":
        """Hosts matching names, node sets (``node[01-03,07]``), globs (``node0*``) or groups
        (``gpu`` or ``@gpu``), comma-separated or a list, in inventory order.  Every term must
        match, and every name of a node set must be a host here."""
        if selection is None:
            return self
        terms = split_terms(selection) if isinstance(selection, str) else [t.strip() for t in selection]
        terms = [t for t in terms if t]
        chosen: set[str] = set()
        names = [h.name for h in self.hosts]
        known = set(names)
        groups = {g for h in self.hosts for g in h.groups}
        where = self.source or "<inventory>"
        for term in terms:
            group = term[1:] if term.startswith("@") else term
            hit = {h.name for h in self.hosts if group in h.groups}
            if any(c in term for c in "*?"):
                hit |= {n for n in names if fnmatch.fnmatchcase(n, term)}
            elif term in known:
                hit.add(term)
            elif not hit and any(c in term for c in "[,!&^"):
                wanted = expand_nodeset(term, f"{where}: --limit '{term}'")
                missing = [n for n in wanted if n not in known]
                if missing and len(missing) < len(wanted):
                    raise InventoryError(f"{where}: --limit '{term}': {fold(missing)} not in the inventory")
                hit = set(wanted) - set(missing)
            if not hit:
                raise InventoryError(
                    f"{where}: --limit '{term}' matches no host or group"
                    f"{_did_you_mean(term, names + sorted(groups))}"
                )
            chosen |= hit
        picked = type(self)([h for h in self.hosts if h.name in chosen], source=self.source)
        picked.installed = list(self.installed)
        picked.file, picked.session = self.file, self.session
        return picked

    # -- as TOML -------------------------------------------------------------------------------
    def to_toml(self, comment: str = "") -> str:
        """An inventory file that loads back to these hosts: values every host shares in
        [defaults], runs of hosts that differ only by numbers folded into one node-set table."""
        tables = {h.name: host_table(h) for h in self.hosts}
        shared: dict[str, Any] = {}
        first = next(iter(tables.values()))
        for key, value in first.items():
            if key not in _HOST_ONLY and all(t.get(key, _MISSING) == value for t in tables.values()):
                shared[key] = value
        own = {n: {k: v for k, v in t.items() if k not in shared} for n, t in tables.items()}
        return to_toml(shared, fold_tables(own), comment)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({[h.name for h in self.hosts]!r})"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {type(value).__name__}")


def to_toml(defaults: dict[str, Any], hosts: dict[str, dict[str, Any]], comment: str = "") -> str:
    """An inventory file's text: ``[defaults]`` and one ``[hosts.NAME]`` table per host,
    ``comment`` lines first (the lab and the Docker cluster write theirs with it)."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    bare = re.compile(r"[A-Za-z0-9_-]+")
    titles = [("defaults", defaults)]
    titles += [(f"hosts.{n if bare.fullmatch(n) else json.dumps(n)}", t) for n, t in hosts.items()]
    for title, table in titles:
        if lines:
            lines.append("")
        lines.append(f"[{title}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# -- node sets (ClusterShell's notation) -----------------------------------------------------------
def _nodeset(text: str = ""):
    from ClusterShell.NodeSet import RESOLVER_NOGROUP, NodeSet  # only where a range is written

    return NodeSet(text, resolver=RESOLVER_NOGROUP)


def expand_nodeset(text: str, where: str) -> list[str]:
    """The names a node set stands for (``node[01-03,07]``, ``a,b``, ``node[1-9/2]``), in
    ClusterShell's order; a plain name stands for itself."""
    if not any(c in text for c in "[,!&^"):
        return [text]
    from ClusterShell.NodeSet import NodeSetException

    try:
        names = list(_nodeset(text))
    except NodeSetException as exc:
        raise InventoryError(f"{where}: not a node set: {exc}") from None
    if not names:
        raise InventoryError(f"{where}: the node set names no host")
    return names


def fold(names: Iterable[str]) -> str:
    """``node01,node02,node03,web`` -> ``node[01-03],web`` (ClusterShell's NodeSet)."""
    ns = _nodeset()
    ns.updaten(list(names))
    return str(ns)


def split_terms(selection: str) -> list[str]:
    """A selection's terms: split at the commas outside brackets (``node0[1,2],gpu``)."""
    terms, depth, start = [], 0, 0
    for i, c in enumerate(selection):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            terms.append(selection[start:i])
            start = i + 1
    terms.append(selection[start:])
    return [t.strip() for t in terms if t.strip()]


def _table_title(name: str) -> str:
    return f"[hosts.{name if re.fullmatch(r'[A-Za-z0-9_-]+', name) else json.dumps(name)}]"


def expand_table(title: str, table: dict, where: str) -> list[tuple[str, dict]]:
    """One (name, table) per name of a host table's node set; a string value holding a range
    expands in step with the names (``address = "10.0.0.[11-20]"``), one without is shared."""
    names = expand_nodeset(title, where)
    stepped: dict[str, list[str]] = {}
    for key, value in table.items():
        if isinstance(value, str) and _RANGE.search(value):
            values = expand_nodeset(value, f"{where}: '{key}'")
            if len(values) != len(names):
                raise InventoryError(f"{where}: '{key}' = {value!r} holds {len(values)} values but the table name"
                                     f" {len(names)}: ranges expand in step, so their lengths must match")
            stepped[key] = values
    return [(name, {**table, **{k: v[i] for k, v in stepped.items()}}) for i, name in enumerate(names)]


def _no_ranges(table: dict, source: str, where: str) -> None:
    for key, value in table.items():
        if isinstance(value, str) and _RANGE.search(value):
            raise InventoryError(f"{source}: {where}: '{key}' = {value!r}: a range expands only in a host table"
                                 " whose name holds one ([hosts.\"node[01-10]\"])")


# -- back to TOML ------------------------------------------------------------------------------------
_MISSING = object()
_DEFAULTS = {f.name: f.default for f in fields(Host) if f.default is not dataclasses.MISSING}


def host_table(host: Host) -> dict[str, Any]:
    """The inventory keys that make this host: those that differ from Host's defaults."""
    table: dict[str, Any] = {}
    for f in fields(Host):
        value = getattr(host, f.name)
        if f.name == "name" or f.name not in _KEYS or value == _DEFAULTS.get(f.name, _MISSING):
            continue
        if f.name == "address" and value == host.name:
            continue
        table[f.name] = dict(value) if f.name == "env" else list(value) if isinstance(value, tuple) else value
    return table


def fold_tables(tables: dict[str, dict]) -> dict[str, dict]:
    """Runs of host tables with the same keys, whose names and differing string values fold
    into node sets that expand back to exactly them, as one table each (``node[01-10]`` with
    ``address = "10.0.0.[11-20]"``); the rest as they are."""
    items = list(tables.items())
    out: dict[str, dict] = {}

    def same_shape(x: tuple[str, dict], y: tuple[str, dict]) -> bool:
        (xn, a), (yn, b) = x, y
        return (re.sub(r"\d+", "#", xn) == re.sub(r"\d+", "#", yn) and a.keys() == b.keys()
                and all(a[k] == b[k] or (isinstance(a[k], str) and isinstance(b[k], str)) for k in a))

    def folded(run: list[tuple[str, dict]]) -> tuple[str, dict] | None:
        title = fold(n for n, _ in run)
        table = {}
        for key, value in run[0][1].items():
            values = [t[key] for _, t in run]
            if all(v == value for v in values):
                if isinstance(value, str) and _RANGE.search(value):
                    return None  # a shared value that reads as a range
                table[key] = value
            else:
                table[key] = fold(values)
                if len(split_terms(table[key])) > 1:
                    return None  # one pattern per value, or it reads as a list
        if len(split_terms(title)) > 1:
            return None
        try:
            back = expand_table(title, table, "")
        except InventoryError:
            return None
        return (title, table) if back == run else None

    def emit(run: list[tuple[str, dict]]) -> None:
        while run:  # the longest head of the run that folds (binary search), then the rest
            lo, hi, best = 2, len(run), None
            while lo <= hi:
                mid = (lo + hi) // 2
                hit = folded(run[:mid])
                if hit:
                    lo, best = mid + 1, (mid, hit)
                else:
                    hi = mid - 1
            if best is None:
                out.update(run[:1])
                run = run[1:]
            else:
                out[best[1][0]] = best[1][1]
                run = run[best[0]:]

    i = 0
    while i < len(items):
        j = i + 1
        while j < len(items) and same_shape(items[i], items[j]):
            j += 1
        emit(items[i:j])
        i = j
    return out


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_table(table: dict, source: str, where: str, base: Path, host_only_ok: bool) -> dict:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _KEYS or (key in _HOST_ONLY and not host_only_ok):
            allowed = [k for k in _KEYS if host_only_ok or k not in _HOST_ONLY]
            raise InventoryError(f"{source}: {where}: unknown key '{key}'{_did_you_mean(key, allowed)}")
        types, desc = _KEYS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise InventoryError(f"{source}: {where}: '{key}' must be {desc}, got {_type_name(value)} {value!r}")
        prefix = f"{source}: {where}: '{key}'"
        if key == "port" and not 0 < value < 65536:
            raise InventoryError(f"{prefix} must be a port number (1-65535), got {value}")
        if key == "slots" and not (value == "auto" or (isinstance(value, int) and value >= 1)):
            raise InventoryError(f"{prefix} must be {desc}, got {value!r}")
        if key == "max_sessions" and value < 1:
            raise InventoryError(f"{prefix} must be {desc}, got {value!r}")
        if key in ("connect_timeout", "keepalive_interval") and value <= 0:
            raise InventoryError(f"{prefix} must be a positive number of seconds, got {value!r}")
        if key == "host_key_checking" and isinstance(value, str) and value != "accept-new":
            raise InventoryError(f"{prefix} must be {desc}, got {value!r}")
        if key == "groups":
            if not all(isinstance(g, str) for g in value):
                raise InventoryError(f"{prefix} must be {desc}")
            value = tuple(value)
        if key == "env":
            bad = [k for k, v in value.items() if not isinstance(v, (str, int, float, bool))]
            if bad:
                raise InventoryError(f"{prefix}: value of '{bad[0]}' must be a string")
            value = tuple((str(k), str(v)) for k, v in value.items())
        if key == "requirements":
            value = _requirement_lines(value, prefix, base)
        if key == "preload":
            if not all(isinstance(m, str) and re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", m) for m in value):
                raise InventoryError(f"{prefix} must be {desc}, got {value!r}")
            value = tuple(value)
        if key in _PATH_KEYS:
            path = Path(os.path.expanduser(value))
            if not path.is_absolute():
                path = base / path
            value = str(path)
            if key == "identity" and not path.is_file():
                raise InventoryError(f"{prefix}: identity file not found: {value}")
            if key == "ssh_config" and not path.is_file():
                raise InventoryError(f"{prefix}: ssh config file not found: {value}")
        if key in ("address", "user", "python", "workdir", "proxy_jump") and not value.strip():
            raise InventoryError(f"{prefix} must not be empty")
        out[key] = value
    return out


def _requirement_lines(value: list | str, prefix: str, base: Path) -> tuple[str, ...]:
    """A list's strings, or the lines of a requirements file (relative to the inventory's folder)."""
    if isinstance(value, list):
        if not all(isinstance(r, str) and r.strip() for r in value):
            raise InventoryError(f"{prefix} must be a list of requirement strings, got {value!r}")
        return tuple(r.strip() for r in value)
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base / path
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError as exc:
        raise InventoryError(f"{prefix}: cannot read the requirements file {path}: {exc.strerror or exc}") from None
    return tuple(line for line in (re.sub(r"(^|\s)#.*$", "", raw).strip() for raw in lines) if line)


def _make_host(name: str, values: dict) -> Host:
    known = {f.name for f in fields(Host)}
    return Host(name=name, **{k: v for k, v in values.items() if k in known})
