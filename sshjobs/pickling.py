"""Pickling a job on the controller: the function (cloudpickle, the user's own modules by
value, the bytes of an unchanged function reused) and its arguments (pickle for plain data,
big payloads out of band).  What the scheduler sends, and what a session client ships."""

from __future__ import annotations

import inspect
import linecache
import os
import pickle
import re
import site
import sys
import sysconfig
import types
import weakref
from typing import Any, Callable

import cloudpickle

from .errors import PicklingError
from .remote import protocol

_INSTALLED = tuple(
    os.path.realpath(p) + os.sep
    for p in {*(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")), *site.getsitepackages()}
)
_BY_VALUE: set[str] = set()
_BY_REF: set[str] = {"__main__", "builtins", "sshjobs"}


def ship_local_code(obj: Any) -> None:
    """Make cloudpickle ship the user's own modules by value.

    cloudpickle pickles a function from an importable module by reference, which a
    bare host cannot import.  Modules that are not installed (not in the stdlib or a
    site-packages folder) are the user's code: register their top-level package for
    pickling by value, and do the same for modules the function refers to by name.
    """
    candidates = [obj, *(getattr(obj, "__globals__", {}).get(n) for n in getattr(getattr(obj, "__code__", None), "co_names", ()))]
    for cand in candidates:
        modname = cand.__name__ if inspect.ismodule(cand) else getattr(cand, "__module__", None)
        if not isinstance(modname, str):
            continue
        top = modname.partition(".")[0]
        if top in _BY_VALUE or top in _BY_REF:
            continue
        module = sys.modules.get(top)
        path = getattr(module, "__file__", None)
        if module is None or not path or os.path.realpath(path).startswith(_INSTALLED):
            _BY_REF.add(top)
            continue
        cloudpickle.register_pickle_by_value(module)
        _BY_VALUE.add(top)


_DYNAMIC_FRAME = re.compile(r'^  File "<dynamic-code>", line (\d+), in (\S+)$')


def code_files(fn: Any) -> dict[str, str]:
    """Function name -> source file, for the code cloudpickle ships (it blanks file names)."""
    if type(fn) is Shipped:
        return fn.files
    found: dict[str, str] = {}
    seen: set[int] = set()

    def walk(code):
        if id(code) in seen:
            return
        seen.add(id(code))
        found.setdefault(code.co_name, code.co_filename)
        for const in code.co_consts:
            if inspect.iscode(const):
                walk(const)

    code = getattr(fn, "__code__", None)
    if code is None:
        return found
    walk(code)
    for name in code.co_names:
        ref = getattr(fn, "__globals__", {}).get(name)
        if inspect.isfunction(ref):
            walk(ref.__code__)
    return found


def enrich_traceback(tb: str, files: dict[str, str]) -> str:
    """Put back file names and source lines in a remote traceback, from the controller's copy."""
    if "<dynamic-code>" not in tb or not files:
        return tb
    out = []
    for line in tb.splitlines(keepends=True):
        m = _DYNAMIC_FRAME.match(line.rstrip("\n"))
        path = m and files.get(m.group(2))
        if m and path:
            out.append(f'  File "{path}", line {m.group(1)}, in {m.group(2)}\n')
            src = linecache.getline(path, int(m.group(1))).strip()
            if src:
                out.append(f"    {src}\n")
        else:
            out.append(line)
    return "".join(out)


_IMMUTABLE = frozenset({int, float, str, bytes, bool, type(None), complex})
_NOT_CACHED = object()
# function -> (fingerprint, pickled bytes): submitting the same function again reuses its bytes
_PICKLED: "weakref.WeakKeyDictionary[Callable, tuple]" = weakref.WeakKeyDictionary()


def _code_names(code, names: set) -> None:
    names.update(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            _code_names(const, names)


def _frozen(value):
    """A comparable snapshot of a value that cannot change behind our back, else _NOT_CACHED."""
    t = type(value)
    if t in _IMMUTABLE:
        return (t, value)
    if t is tuple:
        items = tuple(_frozen(v) for v in value)
        return _NOT_CACHED if _NOT_CACHED in items else (t, items)
    if t is types.BuiltinFunctionType:
        return (t, id(value))
    if t is types.ModuleType:  # only modules pickled by reference: the user's own ship their state
        top = value.__name__.partition(".")[0]
        if top in _BY_REF and top != "__main__":
            return (t, id(value))
    return _NOT_CACHED


def _fingerprint(fn):
    """What cloudpickle would ship for a plain function, if all of it is immutable; else None.

    A function's pickle holds its code, defaults, closure cells and the globals its code
    names.  Reusing the bytes is only right while none of those can have changed, so only
    functions whose cells, defaults and referenced globals are immutable values, modules
    or builtins are cached (a cell holding a list, say, is pickled afresh every time).
    """
    if type(fn) is not types.FunctionType or fn.__dict__:
        return None
    code = fn.__code__
    parts = [id(code), _frozen(fn.__defaults__), _frozen(tuple((fn.__kwdefaults__ or {}).items()))]
    for cell in fn.__closure__ or ():
        try:
            parts.append(_frozen(cell.cell_contents))
        except ValueError:  # an empty cell
            return None
    names: set = set()
    _code_names(code, names)
    g = fn.__globals__
    parts.extend(_frozen(g.get(n)) if n in g else ("builtin", n) for n in sorted(names))
    if _NOT_CACHED in parts:
        return None
    return (code, tuple(parts))


class Shipped:
    """A function pickled elsewhere (a session's client): what the scheduler needs of it, its
    bytes (``data``), its names, the source files of its code (for remote tracebacks) and,
    for a journal, its identity; never unpickled where it is run from."""

    def __init__(self, fn: Callable, identity: tuple[str, str] | None = None):
        self.data = pickle_function(fn)
        self.__module__ = getattr(fn, "__module__", None) or "?"
        self.__qualname__ = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        self.__name__ = getattr(fn, "__name__", None) or self.__qualname__
        self.files = code_files(fn)
        self.identity = identity

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self.__qualname__} was pickled to run on the hosts; it is not callable here")


def pickle_function(fn: Callable) -> bytes:
    if type(fn) is Shipped:
        return fn.data
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")
    ship_local_code(fn)
    try:
        fp = _fingerprint(fn)
    except Exception:
        fp = None
    if fp is not None:
        hit = _PICKLED.get(fn)
        if hit is not None and hit[0] == fp:
            return hit[1]
    try:
        data = cloudpickle.dumps(fn, protocol=5)
    except Exception as exc:
        raise PicklingError(f"cannot pickle the function: {type(exc).__name__}: {exc}") from None
    if fp is not None:
        _PICKLED[fn] = (fp, data)
    return data


_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray})
_BUFFERS = frozenset({bytes, bytearray})
# What _plain() finds, as bits: plain data; a payload big enough for out of band; not plain.
PLAIN, BIG, NOT_PLAIN = 0, 1, 2


def _big(values) -> int:
    return BIG if any([len(v) >= protocol.OOB_MIN for v in values if type(v) in _BUFFERS]) else PLAIN


def _plain(obj) -> int:
    t = type(obj)
    if t in _PLAIN:
        return BIG if t in _BUFFERS and len(obj) >= protocol.OOB_MIN else PLAIN
    if t in (tuple, list):
        types = set(map(type, obj))
        if not _PLAIN.issuperset(types):
            return NOT_PLAIN
        return PLAIN if types.isdisjoint(_BUFFERS) else _big(obj)
    if t is dict:
        keys, values = set(map(type, obj)), set(map(type, obj.values()))
        if not (_PLAIN.issuperset(keys) and _PLAIN.issuperset(values)):
            return NOT_PLAIN
        return (PLAIN if keys.isdisjoint(_BUFFERS) else _big(obj)) | \
            (PLAIN if values.isdisjoint(_BUFFERS) else _big(obj.values()))
    return NOT_PLAIN


class Pickled:
    """dumps() of arguments with big payloads: the in-band pickle (``data``) and the
    out-of-band buffers, (BYTES or BYTEARRAY, bytes), sent as frames before the job's."""

    __slots__ = ("data", "buffers")

    def __init__(self, data: bytes, buffers: list):
        self.data = data
        self.buffers = buffers


def dumps(obj: tuple) -> bytes | Pickled:
    """Plain data goes through pickle (fast); anything else through cloudpickle, which
    ships functions and classes of the controller's __main__ by value.  Payloads of
    protocol.OOB_MIN bytes or more leave the pickle (see protocol.Parts): a bytes argument is
    sent from its own memory, a mutable one (bytearray, numpy array) from a copy taken now."""
    found = PLAIN
    for x in obj:
        found |= _plain(x)
    if found == PLAIN:
        return pickle.dumps(obj, protocol=5)
    out = protocol.Parts(False)
    (cloudpickle.Pickler if found & NOT_PLAIN else pickle.Pickler)(out, protocol=5).dump(obj)
    return Pickled(out.data(), out.buffers) if out.buffers else out.data()
