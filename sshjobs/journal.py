"""A map's journal: every Result committed to a SQLite file as it arrives, so that a
controller that dies (Ctrl-C, kill -9, a closed laptop) loses none it had received, and the
same call run again takes the finished items from the file and runs only the rest.

``Journal(path)`` reads one: its Results in input order, ``counts``, ``failed()``.  The map's
side is ``open_for(path, fn, resume)``: a ``Recorded`` (the items done, checked against the
call's items) and a writer (one transaction per batch of Results, in WAL mode).

A journal belongs to one function over one sequence of items: it records the function's
name and a hash of its code (not its closure's values or globals), and for each item a hash
of its pickle; another function, or an item that differs from the one recorded at its
index, is refused (``JournalError``).  Values are stored pickled: a journal is as trusted
as the code that wrote it (with ``safe_results`` the values stored are those the
restricted unpickler let through).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import sqlite3
import time
from os import PathLike
from typing import Any, Callable, Iterator

import cloudpickle

from .errors import JournalError
from .result import Result
from .version import __version__

FORMAT = "1"
_FETCH = 4096  # rows read at a time when resuming

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hosts (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    idx INTEGER PRIMARY KEY,   -- the item's index in the input
    ok INTEGER NOT NULL,
    item BLOB,                 -- 8 bytes of the item's pickle's hash
    host INTEGER,              -- hosts.id
    value BLOB,                -- the value's pickle (ok) or the error's (not ok)
    micros INTEGER,            -- the run's duration
    attempts INTEGER,
    output BLOB                -- pickled (stdout, stderr), NULL when both are empty
);
"""


def function_identity(fn: Callable) -> tuple[str, str]:
    """``fn``'s qualified name and a hash of its code (bytecode, constants and names of it and
    the code it nests), which line numbers and file names do not change."""
    name = f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', None) or type(fn).__qualname__}"
    digest = hashlib.blake2b(digest_size=8)

    def walk(code) -> None:
        digest.update(code.co_code)
        digest.update(repr(code.co_names).encode())
        for const in code.co_consts:
            if inspect.iscode(const):
                walk(const)
            else:
                digest.update(repr(const).encode())

    target = inspect.unwrap(fn) if callable(fn) else fn
    code = getattr(target, "__code__", None) or getattr(getattr(target, "__call__", None), "__code__", None)
    if code is not None:
        walk(code)
    else:
        digest.update(name.encode())
    return name, digest.hexdigest()


def item_hash(item: Any) -> bytes:
    try:
        data = pickle.dumps(item, protocol=5)
    except Exception:
        data = cloudpickle.dumps(item, protocol=5)
    return hashlib.blake2b(data, digest_size=8).digest()


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives the process's death, not a power cut
    return db


def _meta(db: sqlite3.Connection) -> dict[str, str]:
    return dict(db.execute("SELECT key, value FROM meta"))


def _result(path: str, hosts: dict[int, str], idx: int, ok: int, host: int, value: bytes | None,
            micros: int | None, attempts: int | None, output: bytes | None) -> Result:
    stdout, stderr = pickle.loads(output) if output else ("", "")
    name = hosts.get(host, "-")
    common = dict(stdout=stdout, stderr=stderr, duration=(micros or 0) / 1e6, attempts=attempts or 1, job=idx,
                  meta={"journal": path})
    if ok:
        return Result(host=name, ok=True, value=pickle.loads(value) if value is not None else None, **common)
    return Result(host=name, ok=False, error=pickle.loads(value) if value is not None else None, **common)


class Journal:
    """What a journal file holds: ``for r in Journal("sweep.db")`` gives its Results in input
    order (one per item that ran, the latest run's), ``len()`` their number, ``counts`` a
    dict of ``ok``, ``failed`` and ``total``, ``failed()`` the failed ones, ``function``
    the name of the function that wrote it."""

    def __init__(self, path: str | PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise JournalError(f"{self.path}: no such journal")
        try:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            meta = _meta(self._db)
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.path}: not a journal of sshjobs ({exc})") from None
        if meta.get("format") != FORMAT:
            raise JournalError(f"{self.path}: not a journal of sshjobs (format {meta.get('format')!r})")
        self.meta = meta
        self.function = meta.get("function", "?")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _hosts(self) -> dict[int, str]:
        return dict(self._db.execute("SELECT id, name FROM hosts"))

    def _rows(self, where: str = "") -> Iterator[Result]:
        hosts = self._hosts()
        cur = self._db.execute(f"SELECT idx, ok, host, value, micros, attempts, output FROM results {where} ORDER BY idx")
        while rows := cur.fetchmany(_FETCH):
            for row in rows:
                yield _result(self.path, hosts, *row)

    def __iter__(self) -> Iterator[Result]:
        return self._rows()

    def failed(self) -> Iterator[Result]:
        return self._rows("WHERE ok = 0")

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM results").fetchone()[0]

    @property
    def counts(self) -> dict[str, int]:
        ok, total = self._db.execute("SELECT coalesce(sum(ok), 0), count(*) FROM results").fetchone()
        return {"ok": ok, "failed": total - ok, "total": total}

    def __repr__(self) -> str:
        c = self.counts
        return f"Journal({self.path!r}, function={self.function!r}, ok={c['ok']}, failed={c['failed']})"


class Recorded:
    """The map's side of a journal: ``result(i, item)`` is the Result of item ``i`` when the
    journal has it done (its item checked against ``item``), else None; ``record(batch)``
    commits a batch of Results.  Items are asked for in input order."""

    def __init__(self, path: str, db: sqlite3.Connection, resume: bool):
        self.path = path
        self.db = db
        self.hosts = dict(db.execute("SELECT name, id FROM hosts"))
        self.names = {v: k for k, v in self.hosts.items()}
        self.hashes: dict[int, bytes] = {}  # items sent, until their Result is recorded
        self._rows: list = []
        self._pos = 0
        self._cursor = db.execute("SELECT idx, item, host, value, micros, attempts, output FROM results"
                                  " WHERE ok = 1 ORDER BY idx") if resume else None
        self.resumed = 0

    def _next_done(self):
        if self._pos >= len(self._rows):
            if self._cursor is None:
                return None
            self._rows, self._pos = self._cursor.fetchmany(_FETCH), 0
            if not self._rows:
                self._cursor = None
                return None
        return self._rows[self._pos]

    def result(self, index: int, item: Any) -> Result | None:
        h = item_hash(item)
        row = self._next_done()
        while row is not None and row[0] < index:  # a done index the input no longer reaches (cannot be: in order)
            self._pos += 1
            row = self._next_done()
        if row is None or row[0] != index:
            self.hashes[index] = h
            return None
        self._pos += 1
        if row[1] != h:
            raise JournalError(f"{self.path}: item {index} is not the item this journal ran at that index:"
                               " it was written for other items; pass resume=False (CLI --fresh) to start it over,"
                               " or give another journal file")
        self.resumed += 1
        return _result(self.path, self.names, index, 1, *row[2:])

    def _host_id(self, name: str) -> int:
        found = self.hosts.get(name)
        if found is None:
            found = self.db.execute("INSERT INTO hosts (name) VALUES (?)", (name,)).lastrowid
            self.hosts[name] = found
            self.names[found] = name
        return found

    def record(self, batch: list[Result]) -> None:
        rows = []
        hashes = self.hashes
        host_id = self._host_id
        dumps = pickle.dumps
        for r in batch:
            h = hashes.pop(r.job, None)
            if h is None:  # handed out from the journal itself
                continue
            if r.ok:
                try:
                    value = dumps(r.value, protocol=5)
                except Exception:
                    value = cloudpickle.dumps(r.value, protocol=5)
            else:
                value = dumps(r.error, protocol=5)
            output = dumps((r.stdout, r.stderr), protocol=5) if r.stdout or r.stderr else None
            rows.append((r.job, 1 if r.ok else 0, h, host_id(r.host), value, int(r.duration * 1e6),
                         r.attempts, output))
        if not rows:
            return
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()


def open_for(path: str | PathLike, fn: Callable, resume: bool = True) -> Recorded:
    """The journal at ``path`` for a map of ``fn``: made if missing (or, ``resume=False``,
    started over); refused when another function wrote it."""
    path = os.fspath(path)
    name, code = function_identity(fn)
    try:
        db = _connect(path)
        db.executescript(_SCHEMA)
        meta = _meta(db)
    except sqlite3.DatabaseError as exc:
        raise JournalError(f"{path}: not a journal of sshjobs ({exc})") from None
    if meta and not resume:
        db.executescript("BEGIN; DELETE FROM results; DELETE FROM hosts; DELETE FROM meta; COMMIT;")
        meta = {}
    if meta:
        if meta.get("format") != FORMAT:
            db.close()
            raise JournalError(f"{path}: not a journal of sshjobs (format {meta.get('format')!r})")
        if (meta.get("function"), meta.get("code")) != (name, code):
            db.close()
            what = ("the function's code differs" if meta.get("function") == name
                    else f"it was written by {meta.get('function')}, this call maps {name}")
            raise JournalError(f"{path}: this journal is of another map: {what}; pass resume=False"
                               " (CLI --fresh) to start it over, or give another journal file")
    else:
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                       [("format", FORMAT), ("function", name), ("code", code), ("sshjobs", __version__),
                        ("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))])
    return Recorded(path, db, resume)
