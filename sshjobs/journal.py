"""A map's journal: every Result committed to a SQLite file as it arrives, so that a
controller that dies (Ctrl-C, kill -9, a closed laptop) loses none it had received, and the
same call run again takes the finished items from the file and runs only the rest.

``Journal(path)`` reads one: its Results in input order, ``counts``, ``failed()``.  The map's
side is ``open_for(path, fn, resume)``: a ``Recorded`` (the items done, checked against the
call's items) and a writer (one transaction per batch of Results, in WAL mode, in a thread
of its own; a run of consecutive ok Results of one host is one row).

A journal belongs to one function over one sequence of items: it records the function's
name and a hash of its code (not its closure's values or globals), and for each item a
checksum of its pickle; another function, or an item that differs from the one recorded at its
index, is refused (``JournalError``).  Values are stored pickled: a journal is as trusted
as the code that wrote it (with ``safe_results`` the values stored are those the
restricted unpickler let through).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import os
import pickle
import sqlite3
import time
import zlib
from array import array
from os import PathLike
from typing import Any, Callable, Iterator

import cloudpickle

from .errors import JournalError
from .pickling import Shipped
from .result import Result
from .version import __version__

FORMAT = "2"
_FETCH = 4096  # rows read at a time when resuming

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hosts (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    idx INTEGER PRIMARY KEY,   -- the first item's index
    n INTEGER NOT NULL,        -- the items of the row: a run of ok Results of one host, or one Result
    ok INTEGER NOT NULL,
    host INTEGER,              -- hosts.id
    items BLOB,                -- each item's CRC-32 of its pickle (n unsigned 32-bit ints)
    value BLOB,                -- ok: the pickled list of the n values; not ok: the pickled error
    durations BLOB,            -- n doubles, seconds
    attempts INTEGER,
    output BLOB                -- pickled (stdout, stderr) of a one-Result row, NULL when both are empty
);
"""


def function_identity(fn: Callable) -> tuple[str, str]:
    """``fn``'s qualified name and a hash of its code (bytecode, constants and names of it and
    the code it nests), which line numbers and file names do not change."""
    if type(fn) is Shipped and fn.identity is not None:
        return fn.identity
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


def item_hash(item: Any, dumps=pickle.dumps, crc32=zlib.crc32) -> int:
    """A checksum of the item's pickle: enough to tell another item at the same index (it
    guards against a mistake, not an adversary), and cheap on the map's hot path."""
    try:
        return crc32(dumps(item, 5))
    except Exception:
        return crc32(cloudpickle.dumps(item, protocol=5))


def _pickle(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj, 5)
    except Exception:  # what pickle cannot (a lambda in a value) cloudpickle can
        return cloudpickle.dumps(obj, protocol=5)


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives the process's death, not a power cut
    return db


def _meta(db: sqlite3.Connection) -> dict[str, str]:
    return dict(db.execute("SELECT key, value FROM meta"))


_COLUMNS = "idx, n, ok, host, items, value, durations, attempts, output"


def _expand(path: str, hosts: dict[int, str], idx: int, n: int, ok: int, host: int, items: bytes | None,
            value: bytes | None, durations: bytes | None, attempts: int | None, output: bytes | None) -> list[Result]:
    """The Results of one row, in input order."""
    name = hosts.get(host, "-")
    took = array("d", durations or b"").tolist() or [0.0] * n
    meta = {"journal": path}
    attempts = attempts or 1
    stdout, stderr = pickle.loads(output) if output else ("", "")
    if not ok:
        return [Result(host=name, ok=False, error=pickle.loads(value) if value is not None else None, stdout=stdout,
                       stderr=stderr, duration=took[0], attempts=attempts, job=idx, meta=meta)]
    values = pickle.loads(value) if value is not None else [None] * n
    if output:
        return [Result(host=name, ok=True, value=values[0], stdout=stdout, stderr=stderr, duration=took[0],
                       attempts=attempts, job=idx, meta=meta)]
    return [Result(host=name, ok=True, value=v, duration=d, attempts=attempts, job=i, meta=meta)
            for i, v, d in zip(range(idx, idx + n), values, took)]


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
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM results {where} ORDER BY idx")
        while rows := cur.fetchmany(_FETCH):
            for row in rows:
                yield from _expand(self.path, hosts, *row)

    def __iter__(self) -> Iterator[Result]:
        return self._rows()

    def failed(self) -> Iterator[Result]:
        return self._rows("WHERE ok = 0")

    def __len__(self) -> int:
        return self.counts["total"]

    @property
    def counts(self) -> dict[str, int]:
        ok, total = self._db.execute("SELECT coalesce(sum(ok * n), 0), coalesce(sum(n), 0) FROM results").fetchone()
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
        # Commits run in a thread of their own: SQLite lets go of the GIL while it writes, so
        # the event loop goes on taking Results meanwhile.
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sshjobs-journal")
        self._reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False) if resume else None
        self.hosts = dict(db.execute("SELECT name, id FROM hosts"))
        self.names = {v: k for k, v in self.hosts.items()}
        self.hashes: dict[int, int] = {}  # the items' checksums, from their sending to their Result's record
        self._rows: list = []
        self._pos = 0
        self._cursor = self._reader.execute(f"SELECT {_COLUMNS} FROM results WHERE ok = 1 ORDER BY idx"
                                            ) if self._reader else None
        self._row_results: list[Result] | None = None  # the current done row's, once one is asked for

    def _next_done(self) -> tuple | None:
        if self._pos >= len(self._rows):
            if self._cursor is None:
                return None
            self._rows, self._pos = self._cursor.fetchmany(_FETCH), 0
            if not self._rows:
                self._cursor = None
                return None
        return self._rows[self._pos]

    def take(self, start: int, block: list) -> list[tuple[int, Result]]:
        """Items ``start``, ``start + 1``...: the Results of those the journal has done (their
        items checked); the others are noted, for ``record``."""
        if self._next_done() is None:  # nothing done from here on (a new journal): all to run
            self.hashes.update(zip(range(start, start + len(block)), map(item_hash, block)))
            return []
        done = []
        for i, item in enumerate(block, start):
            r = self.result(i, item)
            if r is not None:
                done.append((i, r))
        return done

    def result(self, index: int, item: Any) -> Result | None:
        h = item_hash(item)
        row = self._next_done()
        while row is not None and row[0] + row[1] <= index:  # rows behind the items asked for
            self._pos += 1
            self._row_results = None
            row = self._next_done()
        if row is None or row[0] > index:
            self.hashes[index] = h
            return None
        offset = index - row[0]
        if array("I", row[4])[offset] != h:
            raise JournalError(f"{self.path}: item {index} is not the item this journal ran at that index:"
                               " it was written for other items; pass resume=False (CLI --fresh) to start it over,"
                               " or give another journal file")
        if self._row_results is None:
            self._row_results = _expand(self.path, self.names, *row)
        return self._row_results[offset]

    def _host_id(self, name: str) -> int:
        found = self.hosts.get(name)
        if found is None:
            found = self.db.execute("INSERT INTO hosts (name) VALUES (?)", (name,)).lastrowid
            self.hosts[name] = found
            self.names[found] = name
        return found

    async def commit(self, batch: list[Result]) -> None:
        """``record(batch)`` in the writer thread, awaited."""
        await asyncio.get_running_loop().run_in_executor(self._writer, self.record, batch)

    def record(self, batch: list[Result]) -> None:
        """Commit a batch: each run of consecutive ok Results of one host without output is
        one row; any other Result a row of its own."""
        runs: list[tuple] = []  # (first Result, values, hashes, durations)
        singles = []
        pop = self.hashes.pop
        last = None
        for r in batch:
            h = pop(r.job, None)
            if h is None:  # handed out from the journal itself
                last = None
                continue
            if r.ok and not (r.stdout or r.stderr):
                if last is not None and r.job == last[0].job + len(last[1]) and r.host == last[0].host \
                        and r.attempts == last[0].attempts:
                    last[1].append(r.value)
                    last[2].append(h)
                    last[3].append(r.duration)
                    continue
                last = (r, [r.value], array("I", [h]), array("d", [r.duration]))
                runs.append(last)
                continue
            last = None
            singles.append((r, h))
        rows = [(first.job, len(values), 1, self._host_id(first.host), hashes.tobytes(), _pickle(values),
                 took.tobytes(), first.attempts, None) for first, values, hashes, took in runs]
        rows += [(r.job, 1, int(r.ok), self._host_id(r.host), array("I", [h]).tobytes(),
                  _pickle([r.value] if r.ok else r.error), array("d", [r.duration]).tobytes(), r.attempts,
                  _pickle((r.stdout, r.stderr)) if r.stdout or r.stderr else None) for r, h in singles]
        if not rows:
            return
        self.db.execute("BEGIN")
        try:
            # rows of earlier runs inside these (the failed items a rerun ran again) give way
            self.db.executemany("DELETE FROM results WHERE idx >= ? AND idx < ?",
                                [(row[0], row[0] + row[1]) for row in rows])
            self.db.executemany(f"INSERT INTO results ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
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
