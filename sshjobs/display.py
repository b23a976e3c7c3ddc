"""What the command line shows: live progress per host, result tables, plain lines, JSON."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections import Counter
from typing import Any, Iterable, TextIO

from . import events
from .log import get_logger
from .result import Result

log = get_logger("sshjobs.cli")

_STYLE = {
    "waiting": "dim", "connecting": "cyan", "connected": "blue", "installing": "magenta",
    "installed": "green", "running": "yellow", "done": "green", "failed": "bold red",
    "reconnecting": "bold yellow", "transferring": "yellow",
}
LIVE_ROWS = 20  # hosts drawn at most; the busiest and failed ones first


class HostProgress:
    __slots__ = ("name", "state", "running", "ok", "failed", "note")

    def __init__(self, name: str):
        self.name = name
        self.state = "waiting"
        self.running = 0
        self.ok = 0
        self.failed = 0
        self.note = ""


class Progress:
    """Follows a Cluster's ``on_event`` hook (``sshjobs.events``); on a terminal draws it live with rich.

    Every event is also logged (INFO) with its host and fields, for ``-v`` and
    ``--log-format json``.
    """

    def __init__(self, hosts: Iterable[str], console=None, title: str = ""):
        self.hosts = {name: HostProgress(name) for name in hosts}
        self.console = console
        self.title = title
        self.t0 = time.perf_counter()
        self._live = None

    # -- events -------------------------------------------------------------------
    def event(self, host: str, event: str, info: dict) -> None:
        log.info(event, host=host, **{k: v for k, v in info.items() if k != "event"})
        h = self.hosts.get(host)
        if h is None:
            h = self.hosts[host] = HostProgress(host)
        if event == events.RUNNING:
            h.running += int(info.get("jobs", 1))
            h.state = "running"
        elif event == events.DONE:
            h.running = max(0, h.running - int(info.get("jobs", 1)))
            h.ok += int(info.get("ok", 0))
            h.failed += int(info.get("failed", 0))
            if info.get("error"):
                h.note = _first_line(str(info["error"]))
            if h.state != "failed":
                h.state = "running" if h.running else "done"
        elif event == events.FAILED:  # the host is unusable
            h.state = "failed"
            h.running = 0
            h.note = _first_line(f"{info.get('error', 'Error')}: {info.get('message', '')}")
        elif event == events.RECONNECTING:  # its connection dropped: it comes back by itself
            h.state = "reconnecting"
            h.running = 0
            h.note = _first_line(f"attempt {info.get('attempt', 1)}: {info.get('error', 'HostLost')}:"
                                 f" {info.get('message', '')}")
        elif event == events.RECONNECTED:
            h.state = "connected"
            h.note = f"reconnected after {fmt_seconds(info.get('down_for'))}"
        elif event == events.INSTALL_FAILED:
            h.state = "failed"
            h.note = _first_line(f"{info.get('type', 'InstallError')}: {info.get('error', '')}")
        elif event == events.TRANSFERRING:
            h.state = "transferring"
            h.note = (f"{info.get('done_files', 0)}/{info.get('files', 0)} files,"
                      f" {fmt_bytes(info.get('done_bytes'))} of {fmt_bytes(info.get('bytes'))}")
        elif event == events.TRANSFERRED:
            h.state = "done"
            h.note = describe_transfer(info)
        elif event == events.TRANSFER_FAILED:
            h.state = "failed"
            h.note = _first_line(f"{info.get('type', 'TransferError')}: {info.get('error', '')}")
        elif event == events.CONNECTED:
            h.state = "connected"
            if info.get("python"):
                h.note = f"python {info['python']}"
        elif event == events.WORKER_STARTED:  # one more slot's worker: the host's state stays
            pass
        else:  # connecting, installing, installed and whatever else a newer core sends
            h.state = event
            if event == events.INSTALLED:
                h.note = ""

    # -- live display -------------------------------------------------------------
    def __enter__(self) -> "Progress":
        self.t0 = time.perf_counter()
        if self.console is not None:
            from rich.live import Live

            self._live = Live(get_renderable=self.render, console=self.console,
                              refresh_per_second=8, transient=True)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def counts(self) -> Counter:
        return Counter(h.state for h in list(self.hosts.values()))

    def render(self):
        from rich.table import Table

        hosts = list(self.hosts.values())
        shown = hosts
        if len(hosts) > LIVE_ROWS:
            order = {"failed": 0, "reconnecting": 1, "running": 2, "installing": 3, "connecting": 4, "connected": 5}
            shown = sorted(hosts, key=lambda h: order.get(h.state, 9))[:LIVE_ROWS]
            keep = {id(h) for h in shown}
            shown = [h for h in hosts if id(h) in keep]
        counts = self.counts()
        jobs_ok = sum(h.ok for h in hosts)
        jobs_failed = sum(h.failed for h in hosts)
        jobs_running = sum(h.running for h in hosts)
        summary = " · ".join(f"{n} {state}" for state, n in counts.items())
        caption = (f"{len(hosts)} hosts: {summary} | jobs: {jobs_running} running, {jobs_ok} ok,"
                   f" {jobs_failed} failed | {time.perf_counter() - self.t0:.1f}s")
        if len(shown) < len(hosts):
            caption += f" | {len(hosts) - len(shown)} more hosts not shown"
        table = Table(box=None, pad_edge=False)
        table.add_column("host", no_wrap=True)
        table.add_column("state", no_wrap=True)
        table.add_column("running", justify="right")
        table.add_column("ok", justify="right")
        table.add_column("failed", justify="right")
        table.add_column("", overflow="ellipsis", no_wrap=True)
        for h in shown:
            style = _STYLE.get(h.state, "")
            table.add_row(h.name, f"[{style}]{h.state}[/]" if style else h.state, str(h.running or ""),
                          str(h.ok or ""), f"[red]{h.failed}[/]" if h.failed else "",
                          f"[red]{_escape(h.note)}[/]" if h.state == "failed" else _escape(h.note))
        from rich.console import Group
        from rich.text import Text

        parts = [Text(self.title, style="bold", overflow="ellipsis", no_wrap=True)] if self.title else []
        return Group(*parts, table, Text(caption, style="dim", overflow="ellipsis", no_wrap=True))


# -- values ---------------------------------------------------------------------------
def short(value: Any, width: int | None = 80) -> str:
    """A value's repr on one line, cut to ``width`` characters."""
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<unprintable {type(value).__name__}: {exc}>"
    text = re.sub(r"\s*\n\s*", " ", text)
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    raise TypeError(type(obj).__name__)


def json_value(value: Any) -> tuple[Any, bool]:
    """(value as JSON data, False) when it can be, else (its repr, True)."""
    try:
        return json.loads(json.dumps(value, default=_json_default, allow_nan=False)), False
    except (TypeError, ValueError, RecursionError):
        return short(value, None), True


def result_json(r: Result, **extra: Any) -> dict:
    value, is_repr = json_value(r.value) if r.ok else (None, False)
    err = r.error
    out = {
        "host": r.host,
        "job": r.job,
        "ok": r.ok,
        "value": value,
        "value_is_repr": is_repr,
        "error": None if err is None else {"type": err.type, "message": err.message, "traceback": err.traceback},
        "duration": round(r.duration, 6),
        "attempts": r.attempts,
        "stdout": r.stdout,
        "stderr": r.stderr,
    }
    out.update(extra)
    return out


def error_line(r: Result, width: int = 400) -> str:
    """The error on one line: multi-line messages (an installer's output) are joined."""
    if r.error is None:
        return "failed"
    text = f"{r.error.type}: {r.error.message}" if r.error.message else r.error.type
    return short_text(" ".join(line.strip() for line in text.splitlines() if line.strip()), width)


def short_text(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def fmt_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    return f"{s * 1000:.1f}ms" if s < 1 else f"{s:.2f}s"


def fmt_duration(s: float) -> str:
    """A span people set (an idle limit, an idle time): 45s, 30m, 2h 5m, 3d 1h."""
    s = int(round(s))
    for unit, size, smaller, small in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            rest = (s % size) // small
            return f"{s // size}{unit}" + (f" {rest}{smaller}" if rest else "")
    return f"{s // 60}m" + (f" {s % 60}s" if s % 60 else "") if s >= 60 else f"{s}s"


# -- results ----------------------------------------------------------------------------
TABLE_ROWS = 200  # rows of a terminal result table; --json or a pipe gives every result


def print_results(results: list[Result], *, console=None, out: TextIO | None = None, verbose: int = 0,
                  per_host: bool = False, title: str = "", describe=None) -> None:
    """A rich table on a terminal (``console``), else one plain line per result on ``out``.

    ``describe(value) -> str`` replaces the value's repr (``install`` shows the environment).
    """
    if console is not None:
        _results_table(results, console, verbose, per_host, title, describe)
    else:
        _results_plain(results, out or sys.stdout, verbose, per_host, describe)


def _results_table(results, console, verbose, per_host, title, describe=None) -> None:
    from rich.table import Table

    shown = results
    if len(results) > TABLE_ROWS:
        bad = [r for r in results if not r.ok][:TABLE_ROWS]
        shown = sorted(bad + [r for r in results if r.ok][: TABLE_ROWS - len(bad)], key=lambda r: r.job)
    table = Table(box=None, pad_edge=False, header_style="bold")
    if not per_host:
        table.add_column("job", justify="right", no_wrap=True)
    table.add_column("host", no_wrap=True)
    table.add_column("value", overflow="ellipsis", no_wrap=True, ratio=1)
    table.add_column("duration", justify="right", no_wrap=True)
    for r in shown:
        cells = [] if per_host else [str(r.job)]
        text = describe(r.value) if describe else short(r.value, 200)
        value = _escape(text) if r.ok else f"[red]{_escape(error_line(r))}[/]"
        mark = "[green]✓[/]" if r.ok else "[red]✗[/]"
        cells += [f"{mark} {_escape(r.host)}", value, fmt_seconds(r.duration)]
        table.add_row(*cells)
    console.print(table)
    if len(shown) < len(results):
        console.print(f"[dim]{len(results) - len(shown)} more results not shown (--json lists every one)[/]")
    for r in results:
        if verbose:
            _details(r, lambda text, style="": console.print(text, style=style or None, markup=False,
                                                            highlight=False, soft_wrap=True), per_host)
    if not verbose and any(not r.ok and r.error is not None and r.error.traceback for r in results):
        console.print("[dim]-v shows the remote tracebacks and the jobs' output[/]")


def _results_plain(results, out, verbose, per_host, describe=None, width: int | None = None) -> None:
    width = width or max((len(r.host) for r in results), default=4)
    for r in results:
        job = "" if per_host else f"job-{r.job}  "
        status = "ok    " if r.ok else "FAILED"
        if not r.ok:
            text = error_line(r)
        else:
            text = describe(r.value) if describe else short(r.value, None if verbose else 200)
        out.write(f"{job}{r.host:<{width}}  {status}  {fmt_seconds(r.duration):>8}  {text}\n")
        if verbose:
            _details(r, lambda text, style="": out.write(text + "\n"), per_host)
    out.flush()


class ResultStream:
    """A map's Results printed as they arrive (``add(batch)``): one JSON object a line
    (``as_json``), one plain line each (no ``console``), or on a terminal one row each, the
    first TABLE_ROWS and then only the failed ones.  Keeps counts, not the Results."""

    def __init__(self, *, as_json: bool = False, console=None, out: TextIO | None = None, verbose: int = 0,
                 width: int = 4):
        self.as_json = as_json
        self.console = console
        self.out = out or sys.stdout
        self.verbose = verbose
        self.width = width
        self.ok = self.failed = self.hidden = self.shown_ok = 0
        self.hosts: set[str] = set()
        self.tracebacks = False

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def add(self, batch: list[Result]) -> None:
        for r in batch:
            if r.ok:
                self.ok += 1
            else:
                self.failed += 1
                self.tracebacks = self.tracebacks or bool(r.error is not None and r.error.traceback)
            self.hosts.add(r.host)
        if self.as_json:
            self.out.write("".join(json.dumps(result_json(r)) + "\n" for r in batch))
            self.out.flush()
        elif self.console is None:
            _results_plain(batch, self.out, self.verbose, False, width=self.width)
        else:
            for r in batch:
                if r.ok and not self.verbose:
                    if self.shown_ok >= TABLE_ROWS:
                        self.hidden += 1
                        continue
                    self.shown_ok += 1
                value = _escape(short(r.value, 200)) if r.ok else f"[red]{_escape(error_line(r))}[/]"
                mark = "[green]✓[/]" if r.ok else "[red]✗[/]"
                self.console.print(f"{r.job:>6}  {mark} {_escape(r.host):<{self.width}}  {fmt_seconds(r.duration):>8}"
                                   f"  {value}", overflow="ellipsis", no_wrap=True, highlight=False)
                if self.verbose:
                    _details(r, lambda text, style="": self.console.print(text, style=style or None, markup=False,
                                                                         highlight=False, soft_wrap=True), False)

    def close(self) -> None:
        if self.console is None or self.as_json:
            return
        if self.hidden:
            self.console.print(f"[dim]{self.hidden} more ok results not shown (--json lists every one)[/]")
        if not self.verbose and self.tracebacks:
            self.console.print("[dim]-v shows the remote tracebacks and the jobs' output[/]")


def _details(r: Result, emit, per_host: bool) -> None:
    label = r.host if per_host else f"job-{r.job} on {r.host}"
    if not r.ok and r.error is not None and r.error.traceback:
        emit(f"--- {label}: remote traceback", "bold red")
        emit(r.error.traceback.rstrip("\n"), "red")
    if r.stdout:
        emit(f"--- {label}: stdout", "bold")
        emit(r.stdout.rstrip("\n"))
    if r.stderr:
        emit(f"--- {label}: stderr", "bold")
        emit(r.stderr.rstrip("\n"))


def summary(results: list[Result], elapsed: float, what: str = "jobs", *,
            failed_hosts: Iterable[tuple[str, Any]] = (), pending: Iterable[str] = ()) -> str:
    """The count line, then each failed host and why (one line each), then the hosts still
    connecting when the work was done (not waited for: the others took every item)."""
    return count_summary(sum(1 for r in results if r.ok), len(results), len({r.host for r in results}), elapsed,
                         what, failed_hosts=failed_hosts, pending=pending)


def count_summary(ok: int, total: int, hosts: int, elapsed: float, what: str = "jobs", *,
                  failed_hosts: Iterable[tuple[str, Any]] = (), pending: Iterable[str] = ()) -> str:
    """``summary`` from counts: ``ok`` of ``total`` Results, from ``hosts`` hosts."""
    failed_hosts, pending = list(failed_hosts), list(pending)
    line = f"{ok} of {total} {what} ok"
    if ok < total:
        line += f", {total - ok} failed"
    line += f" ({hosts} host{'s' if hosts != 1 else ''}, {elapsed:.2f}s)"
    lines = [line]
    if failed_hosts:
        lines[0] += f"; {len(failed_hosts)} host{'s' if len(failed_hosts) != 1 else ''} failed:"
        width = max(len(name) for name, _ in failed_hosts)
        for name, error in failed_hosts:
            why = f"{error.type}: {error.message}" if getattr(error, "message", "") else str(error)
            lines.append(f"  {name:<{width}}  {short_text(' '.join(why.split()), 400)}")
    if pending:
        lines.append(f"still connecting when the {what} were done, not waited for: {fold(pending)}")
    return "\n".join(lines)


# -- host names ---------------------------------------------------------------------------
def fold(names: list[str]) -> str:
    """``node01,node02,node03,web`` -> ``node[01-03],web`` (like clush's node sets)."""
    groups: dict[tuple[str, int], list[int]] = {}
    order: list[tuple[str, int] | str] = []
    for name in names:
        m = re.fullmatch(r"(.*?)(\d+)", name)
        if not m:
            order.append(name)
            continue
        key = (m.group(1), len(m.group(2)))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(int(m.group(2)))
    parts = []
    for item in order:
        if isinstance(item, str):
            parts.append(item)
            continue
        prefix, width = item
        nums = sorted(set(groups[item]))
        if len(nums) == 1:
            parts.append(f"{prefix}{nums[0]:0{width}d}")
            continue
        ranges = []
        start = prev = nums[0]
        for n in nums[1:] + [None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            ranges.append(f"{start:0{width}d}" if start == prev else f"{start:0{width}d}-{prev:0{width}d}")
            if n is not None:
                start = prev = n
        parts.append(f"{prefix}[{','.join(ranges)}]")
    return ",".join(parts)


def print_grouped(rows: list[dict], console) -> None:
    """clush -b style: each distinct output once, under the (folded) hosts that printed it."""
    groups: dict[tuple, list[str]] = {}
    for row in rows:
        key = (row["stdout"], row["stderr"], row["exit_status"], row["error"])
        groups.setdefault(key, []).append(row["host"])
    out = sys.stdout
    for (stdout, stderr, status, error), hosts in groups.items():
        label = f"{fold(hosts)} ({len(hosts)})"
        tail = []
        if status not in (0, None):
            tail.append(f"exit {status}")
        if error:
            tail.append(error)
        head = f"---------------- {label}{'  ' + '; '.join(tail) if tail else ''}"
        if console is not None:
            from rich.markup import escape

            console.print(f"[bold {'red' if tail else 'cyan'}]{escape(head)}[/]", highlight=False, soft_wrap=True)
            if stdout:
                console.print(stdout.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
            if stderr:
                console.print(stderr.rstrip("\n"), style="red", markup=False, highlight=False, soft_wrap=True)
        else:
            out.write(head + "\n")
            if stdout:
                out.write(stdout if stdout.endswith("\n") else stdout + "\n")
            if stderr:
                out.write(stderr if stderr.endswith("\n") else stderr + "\n")
    codes: dict[str, list[str]] = {}
    for row in rows:
        codes.setdefault("-" if row["exit_status"] is None else str(row["exit_status"]), []).append(row["host"])
    parts = [f"{code} on {fold(hosts)}" for code, hosts in codes.items()]
    out.write("exit codes: " + "; ".join(parts) + "\n")
    out.flush()



def yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def print_table(headers: list[str], rows: list[list[str]], console, ok: list[bool] | None = None) -> None:
    if console is not None:
        from rich.markup import escape
        from rich.table import Table

        table = Table(box=None, pad_edge=False, header_style="bold")
        for h in headers:
            table.add_column(h, overflow="fold")
        for i, row in enumerate(rows):
            style = None if ok is None or ok[i] else "red"
            table.add_row(*(escape(str(c)) for c in row), style=style)
        console.print(table)
        return
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())



def describe_env(value: Any) -> str:
    """An install Result's value in short: the environment and how it came to be."""
    if not isinstance(value, dict) or "hash" not in value:
        return short(value)
    how = "already there" if value.get("cached") else f"built (uv: {value.get('uv')})"
    return f"env {value['hash']} {how}: {value.get('env', '')}"



def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def describe_transfer(value: Any) -> str:
    """A put, get or sync Result's value in short: what was copied, and where to."""
    if not isinstance(value, dict) or "files" not in value:
        return short(value)
    n = value["files"]
    text = f"{n} file{'s' if n != 1 else ''}, {fmt_bytes(value.get('bytes', 0))}"
    if "unchanged" in value:
        text += f" sent, {value['unchanged']} unchanged, {value.get('deleted', 0)} deleted"
    where = value.get("remote") or value.get("local")
    return f"{text} -> {where}" if where else text


def age(now: float, then: float | None) -> str:
    if not then:
        return "-"
    s = max(0.0, now - then)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def python_id(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value or "-")
