"""Requirement lists and files, read and checked as the installer on the hosts will read them
(comments dropped; nested -r, -c and -e refused), and merged so that a later line for a
project replaces an earlier one.  No SSH here: a command checks its requirements before it
connects (or asks a session)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from .errors import RequirementsError

_UNSUPPORTED = ("-r", "--requirement", "-c", "--constraint", "-e", "--editable")


def parse_requirements(requirements: str | os.PathLike | Iterable[str]) -> tuple[list[str], list[str]]:
    """(sorted requirement set, option lines such as ``--index-url URL``).

    ``requirements`` is a list of requirement strings, or a path to a requirements file
    (a Path, a string ending in .txt, or an existing file).
    """
    if isinstance(requirements, (str, os.PathLike)):
        path = Path(requirements)
        if isinstance(requirements, os.PathLike) or str(requirements).endswith(".txt") or path.is_file():
            try:
                lines = path.read_text("utf-8").splitlines()
            except OSError as exc:
                raise RequirementsError(f"cannot read the requirements file {path}: {exc.strerror or exc}") from None
        else:
            lines = [str(requirements)]
    else:
        lines = list(requirements)
    reqs: list[str] = []
    opts: list[str] = []
    for raw in lines:
        if not isinstance(raw, str):
            raise RequirementsError(f"a requirement must be a string, not {type(raw).__name__}: {raw!r}")
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        if line.startswith("-"):
            if line.split()[0].split("=")[0] in _UNSUPPORTED:
                raise RequirementsError(f"unsupported requirements line (list the requirements instead): {line}")
            opts.append(line)
        else:
            reqs.append(line)
    if not reqs:
        raise RequirementsError("no requirements given")
    return sorted(set(reqs)), opts


def requirement_lines(requirements: str | os.PathLike | Iterable[str]) -> list[str]:
    """A list, a string or a requirements file as checked lines: options, then requirements."""
    reqs, opts = parse_requirements(requirements)
    return opts + reqs


def requirement_name(line: str) -> str:
    """The project a requirement line is about (normalized, PEP 503), so a later line for the
    same project replaces an earlier one; an option line or a URL is its own key."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[|[<>=!~;@ ]|$)", line)
    if line.lstrip().startswith("-") or not m:
        return line.strip()
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def merge_requirements(*sets: Iterable[str] | None) -> list[str]:
    """Requirement lines of several sets, in order; a line for a project named before
    replaces that one (``["numpy<2"]`` then ``["numpy>=2", "six"]``: numpy>=2 and six)."""
    merged: dict[str, str] = {}
    for lines in sets:
        for line in lines or ():
            key = requirement_name(line)
            merged.pop(key, None)
            merged[key] = line.strip()
    return list(merged.values())
