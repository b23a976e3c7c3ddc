"""The inventory: which hosts to use and how to reach them, from TOML or from code."""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

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

    def __post_init__(self) -> None:
        if not self.address:
            object.__setattr__(self, "address", self.name)

    @property
    def target(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{self.address}{port}"


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
}
_HOST_ONLY = {"address", "groups"}
_ADDING = ("env", "requirements", "preload")  # a host's (or group's) adds to the defaults' instead of replacing
_PATH_KEYS = ("identity", "known_hosts")


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


class BaseInventory:
    """An ordered set of hosts, parsed and checked; nothing here contacts a host.
    ``sshjobs.Inventory`` adds the verbs that run jobs on them."""

    def __init__(self, hosts: Iterable[Host], source: str | None = None):
        self.hosts: list[Host] = list(hosts)
        self.source = source
        # requirement lines installed through this object (``Inventory.install``): its later
        # calls run in that environment, with each host's own ``requirements``
        self.installed: list[str] = []

    # -- construction ----------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "BaseInventory":
        path = Path(path)
        where = str(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise InventoryError(f"{where}: inventory file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InventoryError(f"{where}: cannot read the inventory: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InventoryError(f"{where}: TOML syntax error: {exc}") from None
        return cls.from_dict(data, source=where, base=path.resolve().parent)

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
        common = _check_table(defaults, source, "[defaults]", base, host_only_ok=False)
        groups_table = data.get("groups", {})
        if not isinstance(groups_table, dict) or not all(isinstance(t, dict) for t in groups_table.values()):
            raise InventoryError(f"{source}: 'groups' must be a table of [groups.NAME] tables")
        group_values = {g: _check_table(t, source, f"[groups.{g}]", base, host_only_ok=False)
                        for g, t in groups_table.items()}
        hosts_table = data.get("hosts")
        if not hosts_table:
            raise InventoryError(f"{source}: no hosts: add a [hosts.NAME] table for each host")
        if not isinstance(hosts_table, dict):
            raise InventoryError(f"{source}: 'hosts' must be a table of [hosts.NAME] tables")
        hosts = []
        for name, table in hosts_table.items():
            if not isinstance(table, dict):
                raise InventoryError(f"{source}: host '{name}': expected a table [hosts.{name}], got {_type_name(table)}")
            own = _check_table(table, source, f"host '{name}'", base, host_only_ok=True)
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
    def from_hosts(cls, hosts: Iterable[Host | str | dict], source: str | None = None, **defaults: Any) -> "BaseInventory":
        """Build an inventory in code: ``Host`` objects, names, or dicts of host keys;
        keyword arguments are defaults for every host."""
        where = source or "<inventory>"
        built: list[Host] = []
        for item in hosts:
            if isinstance(item, Host):
                built.append(replace(item, **defaults) if defaults else item)
                continue
            values = dict(defaults)
            if isinstance(item, str):
                values.setdefault("name", item)
            elif isinstance(item, dict):
                values.update(item)
            else:
                raise InventoryError(f"{where}: a host must be a Host, a name or a dict, not {type(item).__name__}")
            name = values.pop("name", None) or values.get("address")
            if not name:
                raise InventoryError(f"{where}: a host needs a name or an address")
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
            key = (h.user, h.address, h.port or 22)
            if key in seen:
                raise InventoryError(
                    f"{where}: host '{h.name}': duplicate address:port {h.address}:{h.port or 22}"
                    f" (already used by host '{seen[key]}')"
                )
            seen[key] = h.name
        return cls(built, source=source)

    # -- selection -------------------------------------------------------------
    def select(self, selection: str | Iterable[str] | None) -> "BaseInventory":
        """Hosts matching names, globs or groups (comma-separated or a list), in inventory order."""
        if selection is None:
            return self
        terms = [t.strip() for t in (selection.split(",") if isinstance(selection, str) else selection)]
        terms = [t for t in terms if t]
        chosen: set[str] = set()
        groups = {g for h in self.hosts for g in h.groups}
        for term in terms:
            hit = {h.name for h in self.hosts if fnmatch.fnmatchcase(h.name, term) or term in h.groups}
            if not hit:
                names = [h.name for h in self.hosts] + sorted(groups)
                raise InventoryError(
                    f"{self.source or '<inventory>'}: --limit '{term}' matches no host or group"
                    f"{_did_you_mean(term, names)}"
                )
            chosen |= hit
        picked = type(self)([h for h in self.hosts if h.name in chosen], source=self.source)
        picked.installed = list(self.installed)
        return picked

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
        if key in ("address", "user", "python", "workdir") and not value.strip():
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
