"""``safe_results``: decode results with a restricted unpickler.

A pickle can name any importable callable and call it, so a host that is compromised
could run code on the controller through an ordinary result.  With ``safe_results`` the
controller unpickles results with an unpickler that builds only builtin data types and
an explicit allowlist (a few stdlib value types, numpy arrays and dtypes), and refuses
anything else with an error naming the refused type.
"""

from __future__ import annotations

import pickle
from typing import Callable, Iterable

from .remote.protocol import Reader  # a file over a buffer that does not copy it first

# Builtin data types a pickle names by module and name (lists, dicts, sets, tuples, str,
# bytes, int, float, bool and None need no name: they are pickle opcodes).
BUILTINS = frozenset(
    f"builtins.{n}" for n in ("complex", "range", "slice", "bytearray", "set", "frozenset",
                              "list", "tuple", "dict", "int", "float", "str", "bytes", "bool")
)
STDLIB = frozenset({
    "collections.OrderedDict", "datetime.date", "datetime.time", "datetime.datetime",
    "datetime.timedelta", "datetime.timezone", "decimal.Decimal", "fractions.Fraction", "uuid.UUID",
})
# numpy arrays (any dtype, contiguous or not, numpy 1.x and 2.x names), dtypes and scalars.
NUMPY = frozenset(
    {"numpy.ndarray", "numpy.dtype"}
    | {f"numpy.{core}.multiarray.{n}" for core in ("core", "_core") for n in ("_reconstruct", "scalar")}
    | {f"numpy.{core}.numeric._frombuffer" for core in ("core", "_core")}
)
DEFAULT_ALLOWED = BUILTINS | STDLIB | NUMPY


class RefusedType(pickle.UnpicklingError):
    """A result named a type that ``safe_results`` does not allow."""

    def __init__(self, name: str):
        super().__init__(
            f"safe_results refused to unpickle {name!r}: only builtin data types, numpy arrays/dtypes and"
            f" the allowlist may be decoded (allow it with safe_results=[{name!r}] if you trust it)"
        )
        self.name = name


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, allowed: frozenset[str], buffers=None):
        super().__init__(file, buffers=buffers)
        self._allowed = allowed

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if full not in self._allowed:
            raise RefusedType(full)
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("safe_results: persistent ids are not allowed")


def make_loads(extra: Iterable[str] = ()) -> Callable:
    """A ``loads(data)`` that builds only allowlisted types (the defaults plus ``extra``,
    each ``"module.QualifiedName"``)."""
    allowed = DEFAULT_ALLOWED | frozenset(extra)

    def safe_loads(data, buffers=None) -> object:
        # Out-of-band buffers (see sshjobs.remote.protocol.Parts) are plain bytes or bytearrays,
        # placed by NEXT_BUFFER: they name no type, so the allowlist needs no entry.
        return _Unpickler(Reader(data), allowed, buffers).load()

    safe_loads.allowed = allowed  # type: ignore[attr-defined]
    return safe_loads


def resolve(*settings) -> Callable | None:
    """The results' loader for a set of ``safe_results`` settings (call, cluster, inventory):
    safe if any asks for it (True or a list of extra allowed names); None = plain pickle."""
    extra: set[str] = set()
    safe = False
    for s in settings:
        if s is None or s is False:
            continue
        safe = True
        if s is not True:
            if isinstance(s, str):
                s = [s]
            extra.update(s)
    return make_loads(extra) if safe else None
