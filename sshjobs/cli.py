"""The ``sshjobs`` command line.

Exit codes: 0 everything ok; 1 a job or a host failed; 2 a usage, inventory or job-file
error (the message names the file and the key); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

import click

from . import sshimport
from .version import __version__
from .errors import (AuthenticationError, ConfigError, ConnectError, HostError, HostKeyError, InventoryError,
                     UsageError)

if TYPE_CHECKING:
    import asyncio

    from .api import Inventory
    from .cluster import Cluster
    from .display import Progress
    from .result import Result
    from .session import Client
# The rest of sshjobs (asyncssh, structlog, rich...) is imported inside the commands, so
# that `sshjobs --version` and `--help` start in a few ms instead of ~0.25 s.

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_INVENTORY = "hosts.toml"


# -- options -----------------------------------------------------------------------------
@dataclass
class Options:
    inventory: str | None = None
    limit: str | None = None
    timeout: float | None = None
    as_json: bool = False
    verbose: int = 0
    quiet: bool = False
    log_format: str = "human"
    no_session: bool = False

    @property
    def tty(self) -> bool:
        return not self.as_json and sys.stdout.isatty()

    def console(self):
        """rich on a terminal; None means plain lines."""
        if not self.tty:
            return None
        from rich.console import Console

        return Console()


def _inventory_options(f):
    f = click.option("--no-session", is_flag=True,
                     help="Connect anew even when `sshjobs up` keeps a session for this inventory.")(f)
    f = click.option("--limit", "-l", metavar="SELECTION",
                     help="Only these hosts: names, node sets, globs or groups, comma-separated (node[01-03,07],node0*,gpu);"
                          " each must match a host.")(f)
    f = click.option("-i", "--inventory", metavar="FILE", envvar="SSHJOBS_INVENTORY", show_envvar=True,
                     help=f"The inventory (TOML). Default: $SSHJOBS_INVENTORY, then ./{DEFAULT_INVENTORY}.")(f)
    return f


def _timeout_option(help: str = "Seconds a job may run; then it fails with Timeout."):
    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS", help=help)


def _output_options(f):
    f = click.option("--log-format", type=click.Choice(["human", "json"]), default="human", show_default=True,
                     help="Logs on stderr: human-readable or one JSON object a line.")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="Results only: no live display, no summary, errors-only logs.")(f)
    f = click.option("-v", "--verbose", count=True,
                     help="Remote tracebacks, the jobs' stdout/stderr and info logs; -vv for debug logs.")(f)
    f = click.option("--json", "as_json", is_flag=True,
                     help="Exactly one JSON object per result on stdout and nothing else.")(f)
    return f


def _install_options(f):
    f = click.option("--offline", is_flag=True, default=None,
                     help="Install from wheels shipped by the controller (hosts without internet).")(f)
    f = click.option("-r", "--requirements", "requirement_files", multiple=True, metavar="FILE",
                     type=click.Path(exists=True, dir_okay=False),
                     help="Install the packages listed in FILE on the hosts first (repeatable).")(f)
    f = click.option("--install", "packages", multiple=True, metavar="PKG",
                     help="Install PKG on the hosts first; the jobs run in that environment (repeatable).")(f)
    return f


def _trace_option(f):
    return click.option("--trace", metavar="FILE", type=click.Path(dir_okay=False),
                        help="Write the run (connects, worker starts, installs, each job's host, slot and outcome)"
                             " to FILE as a Chrome trace, for Perfetto or `sshjobs timeline FILE`.")(f)


def _options(kw: dict) -> Options:
    from .log import configure
    import logging

    opts = Options(**{k: kw.pop(k) for k in list(kw) if k in Options.__dataclass_fields__})
    level = logging.WARNING
    if opts.quiet:
        level = logging.ERROR
    elif opts.verbose >= 2:
        level = logging.DEBUG
    elif opts.verbose:
        level = logging.INFO
    configure(level, opts.log_format)
    return opts


def inventory_path(opts: Options) -> str:
    path = opts.inventory or DEFAULT_INVENTORY
    if opts.inventory is None and not Path(path).exists():
        raise InventoryError(f"{path}: inventory file not found (give one with -i FILE or $SSHJOBS_INVENTORY)")
    return path


def load_inventory(opts: Options) -> Inventory:
    """The inventory, with what ``sshjobs install`` recorded for it: commands run in that environment."""
    from .api import Inventory

    path = inventory_path(opts)
    inv = Inventory.load(path)
    inv.installed = recorded_installs(path)
    if opts.limit is None:
        return inv
    if not any(term.strip() for term in opts.limit.split(",")):
        # an empty selection ("$HOSTS" unset, a stray comma) would pick no host, or all
        raise UsageError(f"--limit {opts.limit!r} names no host or group: give names, globs or groups"
                         " (node0*,gpu), or leave --limit out for every host")
    return inv.select(opts.limit)


# -- what `sshjobs install` recorded, per inventory file, on this controller -------------------
def _records() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")) / "sshjobs" / "installed.json"


def _read_records() -> dict:
    try:
        data = json.loads(_records().read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_installs(inventory: str) -> list[str]:
    """The requirement lines ``sshjobs install`` recorded for this inventory file."""
    lines = _read_records().get(str(Path(inventory).resolve()), [])
    return [line for line in lines if isinstance(line, str)] if isinstance(lines, list) else []


def record_installs(inventory: str, lines: list[str]) -> None:
    """Record (or with no lines, forget) what later commands on this inventory file run in:
    a private file of this controller's user; nothing is left on the hosts for others."""
    data = _read_records()
    key = str(Path(inventory).resolve())
    if lines:
        data[key] = lines
    else:
        data.pop(key, None)
    from .remote.files import write_private

    write_private(str(_records()), json.dumps(data, indent=1).encode("utf-8"))


def read_requirements(packages: tuple[str, ...], files: tuple[str, ...]) -> list[str]:
    """The requirements of PKG arguments and requirements files, checked as the installer
    will read them (comments dropped; -e or nested -r refused) before anything is contacted."""
    from .requirements import parse_requirements

    lines = list(packages)
    for name in files:
        try:
            lines += Path(name).read_text("utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read the requirements file {name}: {exc.strerror or exc}") from None
    reqs, opts = parse_requirements(lines)
    return opts + reqs


# -- job targets ---------------------------------------------------------------------------
def load_target(target: str) -> Callable:
    """``path/to/file.py:func`` or ``package.module:func`` (``func`` may be dotted: Class.method)."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"{target!r}: TARGET must be path/to/file.py:func or package.module:func")
    if where.endswith(".py") or "/" in where or os.sep in where:
        module = _load_file(Path(where))
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: the current folder's modules
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise UsageError(f"{where}: cannot import the module: {exc}") from None
        except Exception as exc:
            raise UsageError(f"{where}: importing the module failed:\n{_format_exc(exc)}") from None
    obj: Any = module
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{where}: has no {name!r}") from None
    if not callable(obj):
        raise UsageError(f"{where}: {name!r} is not callable (it is {type(obj).__name__})")
    return obj


def _load_file(path: Path):
    if not path.is_file():
        raise UsageError(f"{path}: job file not found")
    # The file's own name, so its sibling modules import as they would under `python file.py`.
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else "_sshjobs_job"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise UsageError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:
        raise UsageError(f"{path}: loading the job file failed:\n{_format_exc(exc)}") from None
    return module


def _format_exc(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


def parse_arg(text: str) -> Any:
    """A command-line argument: JSON when it parses (3, 2.5, true, [1, 2], "x"), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def iter_items(source) -> Iterator[Any]:
    """One JSON value per line (blank lines skipped), read as they are asked for."""
    name = getattr(source, "name", "<args>")
    for lineno, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{name}:{lineno}: not a JSON value: {exc}") from None


def read_in_thread(items: Iterator[Any]) -> Any:
    """``items`` as an async iterator, read in a thread of its own: a source that waits for
    its next line (stdin, a pipe) then holds up no connection and no result."""
    import asyncio
    import threading

    async def lines():
        loop = asyncio.get_running_loop()
        got: asyncio.Queue = asyncio.Queue(256)

        def put(entry) -> bool:
            try:
                asyncio.run_coroutine_threadsafe(got.put(entry), loop).result()
            except (RuntimeError, asyncio.CancelledError):  # the map is over
                return False
            return True

        def pump() -> None:
            try:
                for item in items:
                    if not put((True, item)):
                        return
            except BaseException as exc:
                put((False, exc))
            else:
                put((False, None))

        threading.Thread(target=pump, name="sshjobs-args", daemon=True).start()
        while True:
            more, item = await got.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item

    return lines()


# -- running --------------------------------------------------------------------------------
@dataclass
class HostsSeen:
    """What became of the hosts in a command: the failed ones (name, why), the ones still
    connecting when the work was done (a map's other hosts took every item), and each
    host's ``HostState.info()``."""

    failed: list[tuple[str, HostError]]
    pending: list[str]
    infos: list[dict]

    @classmethod
    def of(cls, infos: list[dict]) -> "HostsSeen":
        return cls([(i["name"], i["error"]) for i in infos if i["error"] is not None],
                   [i["name"] for i in infos if i["error"] is None and not i["up"]], infos)


# what a command sends a session: via(client, on_event, seen) -> its value (see run_cluster)
Via = Callable[["Client", Callable, list], Any]


def through_session(inv: Inventory, opts: Options, progress: Progress, call: Callable[[Client, Callable | None], Any]
                    ) -> tuple[Any] | tuple[()]:
    """``(call(client, on_event),)`` under the live display, through the session `sshjobs up`
    keeps for this inventory; ``()`` when there is none to serve it (or --no-session): run directly."""
    if opts.no_session:
        return ()
    from .session import Stale, find

    client = find(inv)
    if client is None:
        return ()
    # events feed the live display and -v's logs: without either, the session sends none
    hear = progress.event if progress.console is not None or opts.verbose else None
    try:
        with progress:
            return (call(client, hear),)
    except Stale:
        return ()


def run_cluster(inv: Inventory, opts: Options, work: Callable[[Cluster], Awaitable[Any]], *, title: str,
                offline: bool | None = None, seen: list[HostsSeen] | None = None, trace: str | None = None,
                via: Via | None = None) -> Any:
    """``work(cluster)`` under the live display (api.run_sync: the one way to run a Cluster),
    or ``via(client, on_event, seen)`` through the session `sshjobs up` keeps for the inventory
    (not with ``offline`` or ``trace``: those are a Cluster's own); ``seen`` receives what
    became of the hosts; ``trace``: the Cluster's trace file."""
    from .display import Progress
    console = opts.console() if not opts.quiet else None
    progress = Progress([h.name for h in inv], console=console, title=title)
    if via is not None and offline is None and trace is None:
        infos: list[dict] = []
        served = through_session(inv, opts, progress, lambda client, hear: via(client, hear, infos))
        if served:
            if seen is not None:
                seen.append(HostsSeen.of(infos))
            return served[0]
    from .api import run_sync

    async def shown(cluster: Cluster) -> Any:
        with progress:
            value = await work(cluster)
        if seen is not None:
            seen.append(HostsSeen.of([s.info() for s in cluster.hosts]))
        return value

    return run_sync(inv, shown, on_event=progress.event, offline=offline, trace=trace)


def run_jobs(inv: Inventory, opts: Options, work: Callable[[Cluster], Awaitable[list[Result]]], *,
             title: str, per_host: bool = False, what: str = "jobs", offline: bool | None = None,
             describe: Callable[[Any], str] | None = None, trace: str | None = None, via: Via | None = None) -> int:
    """Connect, run ``work(cluster)`` under the live display, print the results and a summary
    naming the hosts that failed; the exit code (1 when a job or a host failed)."""
    from .display import summary
    t0 = time.perf_counter()
    seen: list[HostsSeen] = []
    results = run_cluster(inv, opts, work, title=title, offline=offline, seen=seen, trace=trace, via=via)
    hosts = seen[0] if seen else HostsSeen([], [], [])
    elapsed = time.perf_counter() - t0
    emit_results(results, opts, per_host=per_host, title=title, describe=describe)
    ok = bool(results) and all(r.ok for r in results) and not hosts.failed
    if not opts.as_json and not opts.quiet:
        print_summary(opts, summary(results, elapsed, what, failed_hosts=hosts.failed, pending=hosts.pending), ok)
    return EXIT_OK if ok else EXIT_FAILED


def print_summary(opts: Options, text: str, ok: bool) -> None:
    """The summary lines: green or red on a terminal, plain otherwise."""
    console = opts.console()
    if console is not None:
        console.print(text, style="green" if ok else "red", highlight=False, markup=False)
    else:
        print(text)


def emit_results(results: list[Result], opts: Options, *, per_host: bool = False, title: str = "",
                 describe: Callable[[Any], str] | None = None) -> None:
    from .display import print_results, result_json
    if opts.as_json:
        for r in results:
            sys.stdout.write(json.dumps(result_json(r)) + "\n")
        sys.stdout.flush()
        return
    console = opts.console()
    print_results(results, console=console, verbose=opts.verbose, per_host=per_host,
                  title=title if console is not None else "", describe=describe)


# -- the commands ---------------------------------------------------------------------------
class _Group(click.Group):
    def list_commands(self, ctx):  # in the order they were added, not sorted
        return list(self.commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sshjobs")
def cli():
    """Run Python functions on SSH hosts that have nothing but sshd and python3.

    Exit codes: 0 all ok, 1 some job or host failed, 2 usage or inventory error, 130 interrupted.
    """


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("target")
@click.argument("args", nargs=-1)
@_inventory_options
@_timeout_option()
@_install_options
@_trace_option
@_output_options
def run(target, args, packages, requirement_files, offline, trace, **kw):
    """Call TARGET(*ARGS) once on every host.

    TARGET is path/to/file.py:func or package.module:func. Each ARG is passed as JSON when it
    parses as JSON (3, 2.5, true, '[1, 2]', '"3"'), else as a string. Put -- before
    arguments that start with a dash.
    """
    opts = _options(kw)
    fn = load_target(target)
    values = [parse_arg(a) for a in args]
    inv = load_inventory(opts)
    reqs = read_requirements(packages, requirement_files) if packages or requirement_files else []

    async def work(cluster: Cluster) -> list[Result]:
        extra = {"requirements": reqs} if reqs else {}  # installed first; jobs run in that environment
        return await cluster.gather(fn, *values, timeout=opts.timeout, **extra)

    def via(client: Client, on_event, seen: list) -> list[Result]:
        return client.gather(fn, tuple(values), {}, timeout=opts.timeout, requirements=reqs or None, safe_results=None,
                             on_event=on_event, seen=seen)

    return run_jobs(inv, opts, work, title=f"run {target}", offline=offline, trace=trace, via=via)


@cli.command("map")
@click.argument("target")
@click.option("--range", "count", type=click.IntRange(min=0), metavar="N",
              help="Items 0 .. N-1 (N = 0: no items, see below).")
@click.option("--args", "args_file", type=click.File("r"), metavar="FILE",
              help="Items from FILE, one JSON value per line, read as the map goes (- reads stdin).")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run a job again (on any host) when its worker or host was lost.")
@click.option("--journal", metavar="FILE", type=click.Path(dir_okay=False),
              help="Commit every result to FILE (SQLite) as it arrives; run again with it to run only the items"
                   " not done (see `sshjobs results`).")
@click.option("--fresh", is_flag=True, help="Start the --journal over instead of resuming it.")
@_inventory_options
@_timeout_option()
@_install_options
@_trace_option
@_output_options
def map_cmd(target, count, args_file, retries, journal, fresh, packages, requirement_files, offline, trace,
            **kw):
    """Call TARGET(item) for every item, spread over every slot of every host.

    TARGET is path/to/file.py:func or package.module:func; give the items with --range N
    or --args FILE. Each result is printed as it arrives, in input order. Exit 1 when a
    job or a host failed, even when the other hosts ran every item; the summary names
    each failed host and why.

    No items (--range 0, an empty --args file) is no error: nothing is contacted and the
    exit code is 0.
    """
    import itertools

    opts = _options(kw)
    if (count is None) == (args_file is None):
        raise click.UsageError("give exactly one of --range N and --args FILE")
    if fresh and not journal:
        raise click.UsageError("--fresh starts a --journal over: give --journal FILE too")
    fn = load_target(target)
    inv = load_inventory(opts)
    reqs = read_requirements(packages, requirement_files) if packages or requirement_files else []
    items: Any
    streaming = False  # items from a pipe: read in a thread, sent one by one
    if count is not None:
        items = range(count)
    else:
        lines = iter_items(args_file)
        first = next(lines, _NONE)  # a bad first line is a usage error before anything is contacted
        items = () if first is _NONE else itertools.chain([first], lines)
        streaming = bool(items) and not _regular_file(args_file)
    if not items:
        if not opts.as_json and not opts.quiet:
            print("0 items: nothing to run, no host contacted")
        return EXIT_OK
    from .display import ResultStream, count_summary

    stream = ResultStream(as_json=opts.as_json, console=opts.console(), verbose=opts.verbose,
                          width=max((len(h.name) for h in inv), default=4))
    failure: list[BaseException] = []

    async def work(cluster: Cluster) -> None:
        run = await cluster._start_map(fn, read_in_thread(items) if streaming else items, ordered=True, chunksize=None,
                                       timeout=opts.timeout, retries=retries, requirements=reqs or None,
                                       journal=journal, resume=not fresh, safe_results=None, progress=False)
        try:
            await run.collect(stream.add)
        except ConfigError as exc:  # the input's bad line, or an item the journal ran differs
            failure.append(exc)

    def via(client: Client, on_event, seen: list) -> None:
        batches = client.imap(fn, items, on_event=on_event, seen=seen, streaming=streaming, ordered=True,
                              chunksize=None, timeout=opts.timeout, retries=retries, requirements=reqs or None,
                              journal=journal, resume=not fresh, safe_results=None)
        try:
            for batch in batches:
                stream.add(batch)
        except ConfigError as exc:
            failure.append(exc)

    t0 = time.perf_counter()
    seen: list[HostsSeen] = []
    run_cluster(inv, opts, work, title=f"map {target}", offline=offline, seen=seen, trace=trace, via=via)
    stream.close()
    if failure:
        raise failure[0]
    hosts = seen[0] if seen else HostsSeen([], [], [])
    ok = stream.total > 0 and stream.failed == 0 and not hosts.failed
    if not opts.as_json and not opts.quiet:
        print_summary(opts, count_summary(stream.ok, stream.total, len(stream.hosts), time.perf_counter() - t0, "jobs",
                                          failed_hosts=hosts.failed, pending=hosts.pending), ok)
    return EXIT_OK if ok else EXIT_FAILED


_NONE = object()


def _regular_file(f) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


@cli.command()
@click.argument("journal", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per result on stdout.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout: job, host, ok, value, error, duration, attempts.")
@click.option("--failed", "only_failed", is_flag=True, help="Only the failed results.")
@click.option("-v", "--verbose", count=True, help="Remote tracebacks and the jobs' stdout/stderr.")
def results(journal, as_json, as_csv, only_failed, verbose):
    """Print what a map's journal FILE holds (`sshjobs map --journal FILE`), in input order.

    Exit 1 when it holds a failed result, else 0.
    """
    from .display import ResultStream, json_value, error_line
    from .journal import Journal

    if as_json and as_csv:
        raise click.UsageError("give one of --json and --csv")
    with Journal(journal) as j:
        counts = j.counts
        rows = j.failed() if only_failed else iter(j)
        if as_csv:
            import csv

            out = csv.writer(sys.stdout)
            out.writerow(["job", "host", "ok", "value", "error", "duration", "attempts"])
            for r in rows:
                value = json.dumps(json_value(r.value)[0]) if r.ok else ""
                out.writerow([r.job, r.host, int(r.ok), value, "" if r.ok else error_line(r),
                              f"{r.duration:.6f}", r.attempts])
        else:
            opts = Options(as_json=as_json, verbose=verbose)
            stream = ResultStream(as_json=as_json, console=opts.console(), verbose=verbose)
            batch: list = []
            for r in rows:
                batch.append(r)
                if len(batch) >= 1000:
                    stream.add(batch)
                    batch = []
            stream.add(batch)
            stream.close()
            if not as_json:
                text = f"{counts['ok']} of {counts['total']} ok" + (f", {counts['failed']} failed" if counts["failed"] else "")
                print(f"{text} in {journal} (map of {j.function})")
    return EXIT_FAILED if counts["failed"] else EXIT_OK


@cli.command()
@click.argument("packages", nargs=-1)
@click.option("-r", "--requirements", "requirement_files", multiple=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False), help="Install the packages listed in FILE.")
@click.option("--offline", is_flag=True, default=None,
              help="Ship the wheels from the controller (hosts without internet).")
@click.option("--forget", is_flag=True,
              help="Forget what earlier installs recorded for this inventory (nothing is contacted).")
@_inventory_options
@_output_options
def install(packages, requirement_files, offline, forget, **kw):
    """Install packages on every host, in an environment the later commands run in.

    Name them (sshjobs install numpy 'pandas>=2') or list them in a file (-r requirements.txt).
    The set is recorded for this inventory file on this machine, added to what was installed
    before (a package named again replaces its earlier line): later run and map
    commands with the same inventory run in it, installing it on a host that lacks it.
    --forget drops the record. The inventory's own `requirements` key is the lasting way.
    """
    from .display import describe_env

    opts = _options(kw)
    path = inventory_path(opts)
    if forget:
        if packages or requirement_files:
            raise click.UsageError("--forget takes no packages")
        had = recorded_installs(path)
        record_installs(path, [])
        if not opts.quiet:
            print(f"forgot {' '.join(had)} for {path}" if had else f"nothing recorded for {path}", file=sys.stderr)
        return EXIT_OK
    if not packages and not requirement_files:
        raise click.UsageError("name at least one package, or -r FILE")
    reqs = read_requirements(packages, requirement_files)
    inv = load_inventory(opts)
    done: list[list[str]] = []

    async def work(cluster: Cluster) -> list[Result]:
        results = await cluster.install(reqs, offline=offline)
        done.append(cluster.installed)
        return results

    def via(client: Client, on_event, seen: list) -> list[Result]:
        results, installed = client.call("install", reqs, offline=offline, on_event=on_event, seen=seen)
        done.append(installed)
        return results

    code = run_jobs(inv, opts, work, title=f"install {' '.join(reqs)}", per_host=True, what="hosts",
                    describe=describe_env, via=via)
    if done and done[0] != inv.installed:
        record_installs(path, done[0])
        if not opts.quiet and not opts.as_json:
            print(f"Later commands with {path} run in this environment ({' '.join(done[0])});"
                  " `sshjobs install --forget` stops that.", file=sys.stderr)
    return code


@cli.command()
@click.option("--count", "-c", type=click.IntRange(min=1), default=3, show_default=True,
              help="Round trips per host; the median is shown.")
@_inventory_options
@_timeout_option("Seconds to wait for each round trip.")
@_output_options
def ping(count, **kw):
    """Per host: reachable, logged in, Python version, round trip through the worker, start times."""
    from .display import fmt_seconds, print_table, yes_no
    opts = _options(kw)
    inv = load_inventory(opts)
    console = opts.console() if not opts.quiet else None

    seen: list[HostsSeen] = []
    results = run_cluster(inv, opts, lambda cluster: cluster.ping(rounds=count, timeout=opts.timeout), title="ping",
                          seen=seen, via=lambda client, on_event, got: client.call("ping", count, opts.timeout,
                                                                                   on_event=on_event, seen=got))
    rows = [_ping_row(info, r) for info, r in zip(seen[0].infos, results)]
    if opts.as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        headers = ["host", "target", "reachable", "auth", "python", "rtt", "connect", "start", "error"]
        cells = [[row["host"], row["target"], yes_no(row["reachable"]), yes_no(row["auth"]), row["python"] or "-",
                  fmt_seconds(row["rtt"]), fmt_seconds(row["connect_time"]), fmt_seconds(row["start_time"]),
                  row["error"] or ""] for row in rows]
        print_table(headers, cells, console, ok=[row["ok"] for row in rows])
        if not opts.quiet:
            ok = sum(row["ok"] for row in rows)
            print(f"{ok} of {len(rows)} hosts answered")
    return EXIT_OK if all(row["ok"] for row in rows) else EXIT_FAILED


def _ping_row(info: dict, result: Result) -> dict:
    """A host's row of ``sshjobs ping``, from its ``HostState.info()`` and its ping's Result."""
    # a host that refused the key or showed another host key was reached, not logged in to
    error = info["error"]
    unreachable = isinstance(error, ConnectError) and not isinstance(error, (AuthenticationError, HostKeyError))
    reachable = info["connected"] or (error is not None and not unreachable)
    python = ".".join(map(str, info["python"])) or None
    message = None if result.ok else (f"{result.error.type}: {result.error.message}" if result.error else "failed")
    return {
        "host": info["name"], "target": info["target"], "ok": result.ok, "reachable": reachable,
        "auth": info["connected"] if reachable else None, "python": python,
        "rtt": result.value if result.ok else None, "connect_time": info["connect_time"],
        "start_time": info["start_time"], "error": message,
    }


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, required=True)
@_inventory_options
@_timeout_option("Seconds the command may run; then it is killed and the host fails.")
@_output_options
def exec_cmd(command, **kw):
    """Run a shell command on every host: sshjobs exec -i INV -- CMD...

    One argument is a shell command line ('uname -r; df -h /'); several are quoted one by
    one. Identical outputs are shown once with the hosts that printed them (like clush -b),
    then the exit codes.
    """
    from .display import Progress, print_grouped
    opts = _options(kw)
    inv = load_inventory(opts)
    line = command[0] if len(command) == 1 else shlex.join(command)
    console = opts.console() if not opts.quiet else None
    progress = Progress([h.name for h in inv], console=console, title=f"exec {line}")
    served = through_session(inv, opts, progress, lambda client, hear: client.exec(line, opts.timeout, on_event=hear))
    if served:
        rows = served[0]
    else:
        from .api import run_loop

        async def go():
            import asyncio

            sem = asyncio.Semaphore(64)
            with progress:
                return await asyncio.gather(*(_exec_one(h, line, opts.timeout, sem, progress) for h in inv))

        rows = run_loop(inv, go)
    if opts.as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_grouped(rows, console)
    return EXIT_OK if all(r["ok"] for r in rows) else EXIT_FAILED


async def _exec_one(host, line: str, timeout: float | None, sem: asyncio.Semaphore, progress: Progress) -> dict:
    from . import events
    from .connection import HostLink, exec_row, run_line

    t0 = time.perf_counter()
    async with sem:
        progress.event(host.name, events.CONNECTING, {})
        try:
            link = await HostLink.open(host)
        except ConnectError as exc:
            progress.event(host.name, events.FAILED, {"error": exc.kind, "message": exc.message})
            row = exec_row(host.name, None, timeout, f"{exc.kind}: {exc.message}")
            row["duration"] = time.perf_counter() - t0
            return row
    progress.event(host.name, events.RUNNING, {"jobs": 1, "job": 0})
    try:
        row = await run_line(link, host.name, line, timeout)
    finally:
        link.close()
        await link.wait_closed()
    row["duration"] = time.perf_counter() - t0
    progress.event(host.name, events.DONE, events.exec_done(row))
    return row


def _via(method: str, *args: Any) -> Via:
    """A command's call of ``cluster.METHOD(*args)``, through a session."""
    return lambda client, on_event, seen: client.call(method, *args, on_event=on_event, seen=seen)


# -- files to and from the hosts ---------------------------------------------------------------
@cli.command()
@click.argument("local", type=click.Path(exists=True))
@click.argument("remote_dir")
@_inventory_options
@_output_options
def put(local, remote_dir, **kw):
    """Copy LOCAL (a file, or a folder and all it holds) into REMOTE_DIR on every host.

    REMOTE_DIR is created if missing; a relative one (or ~/...) is under each host's home. Files
    go over SFTP on each host's connection, every host at once, each under a temporary name
    renamed into place. Exit 1 when a host failed (a path it may not write, a full disk).
    """
    from .display import describe_transfer
    opts = _options(kw)
    inv = load_inventory(opts)
    return run_jobs(inv, opts, lambda cluster: cluster.put(local, remote_dir), title=f"put {local} {remote_dir}",
                    per_host=True, what="hosts", describe=describe_transfer,
                    via=_via("put", os.path.abspath(local), remote_dir))


@cli.command()
@click.argument("remote_path")
@click.argument("local_dir", type=click.Path(file_okay=False))
@_inventory_options
@_output_options
def get(remote_path, local_dir, **kw):
    """Copy REMOTE_PATH (a file or folder) from every host into LOCAL_DIR/HOST/.

    Each host's copy goes into a folder named after the host, created if missing; a relative
    REMOTE_PATH is under the host's home. Exit 1 when a host failed (it has no such path, say).
    """
    from .display import describe_transfer
    opts = _options(kw)
    inv = load_inventory(opts)
    return run_jobs(inv, opts, lambda cluster: cluster.get(remote_path, local_dir),
                    title=f"get {remote_path} {local_dir}", per_host=True, what="hosts", describe=describe_transfer,
                    via=_via("get", remote_path, os.path.abspath(local_dir)))


@cli.command()
@click.argument("local_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("remote_dir")
@click.option("--delete", is_flag=True, help="Also remove from REMOTE_DIR what LOCAL_DIR does not have.")
@_inventory_options
@_output_options
def sync(local_dir, remote_dir, delete, **kw):
    """Make REMOTE_DIR on every host hold LOCAL_DIR's files, sending only those that changed.

    Each host hashes its copy (sha256) and only the files whose content differs are sent, so
    a second sync of an unchanged folder sends nothing. A relative REMOTE_DIR is under the
    host's home. Exit 1 when a host failed.
    """
    from .display import describe_transfer
    opts = _options(kw)
    inv = load_inventory(opts)
    flag = " --delete" if delete else ""
    return run_jobs(inv, opts, lambda cluster: cluster.sync(local_dir, remote_dir, delete=delete),
                    title=f"sync {local_dir} {remote_dir}{flag}", per_host=True, what="hosts",
                    describe=describe_transfer, via=_via("sync", os.path.abspath(local_dir), remote_dir, delete))


@cli.command()
@_inventory_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per host on stdout.")
@click.option("--from-ansible", "ansible", metavar="FILE",
              help="Read an Ansible inventory (INI, YAML; any source with ansible-core installed) and print it as TOML.")
@click.option("--from-ssh-config", "ssh_pattern", metavar="PATTERN", is_flag=False, flag_value="*",
              help="Read the Host entries of ~/.ssh/config matching PATTERN (default *) and print them as TOML.")
@click.option("--ssh-config", "ssh_config", metavar="FILE", default="~/.ssh/config", show_default=True,
              help="The ssh_config file --from-ssh-config reads.")
@click.pass_context
def inventory(ctx, inventory, limit, no_session, as_json, ansible, ssh_pattern, ssh_config):
    """Show the hosts as a connection reaches them (nothing is contacted), or convert.

    The table shows each host's address, user and port as ~/.ssh/config resolves them
    where the inventory leaves them unset, else the local user and port 22.

    \b
    --from-ansible FILE, --from-ssh-config [PATTERN]: print those hosts as a
    TOML inventory instead (save it as hosts.toml); --limit applies.
    """
    import logging

    from .display import print_table
    from .log import configure

    opts = Options(inventory=inventory, limit=limit, as_json=as_json)
    configure(logging.WARNING)
    if ansible and ssh_pattern:
        raise click.UsageError("give one of --from-ansible and --from-ssh-config")
    if (ansible or ssh_pattern) and ctx.get_parameter_source("inventory") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("-i FILE and --from-* each name the inventory: give one")
    # BaseInventory (parsing only): nothing here needs SSH, so asyncssh is not imported,
    # except by ~/.ssh/config's parser when there is one to read
    from .inventory import BaseInventory

    if ansible or ssh_pattern:
        if ansible:
            inv, what = BaseInventory.from_ansible(ansible), f"the Ansible inventory {ansible}"
        else:
            inv, what = BaseInventory.from_ssh_config(ssh_pattern, ssh_config), f"{ssh_config}, Host {ssh_pattern}"
        inv = inv.select(limit) if limit else inv
        if not as_json:
            notes = "".join(f"\n{note}" for note in inv.notes)
            sys.stdout.write(inv.to_toml(f"sshjobs inventory: the hosts of {what}{notes}"))
            return EXIT_OK
    else:
        path = inventory_path(opts)
        inv = BaseInventory.load(path)
        inv.installed = recorded_installs(path)  # as load_inventory: what `sshjobs install` recorded
        inv = inv.select(limit) if limit else inv
    reached = [h.resolved for h in inv]
    if as_json:
        from .requirements import merge_requirements

        for h, r in zip(inv, reached):
            print(json.dumps({
                "host": h.name, "address": r.address, "port": r.port, "user": r.user, "proxy_jump": r.proxy_jump,
                "groups": list(h.groups), "slots": h.slots, "python": h.python, "workdir": h.workdir,
                "identity": r.identity, "known_hosts": r.known_hosts, "host_key_checking": h.host_key_checking,
                "connect_timeout": h.connect_timeout, "offline": h.offline,
                "requirements": merge_requirements(h.requirements, inv.installed), "preload": list(h.preload),
                "env": sorted(k for k, _ in h.env),  # names only: values may hold credentials
            }))
        return EXIT_OK
    headers = ["host", "address", "port", "user", "groups", "slots", "python", "workdir", "env"]
    rows = [[h.name, r.address, str(r.port), r.user, ",".join(h.groups) or "-", str(h.slots),
             h.python, h.workdir, ",".join(k for k, _ in h.env) or "-"] for h, r in zip(inv, reached)]
    if any(r.proxy_jump for r in reached):
        headers.append("via")
        for row, r in zip(rows, reached):
            row.append(r.proxy_jump or "-")
    print_table(headers, rows, opts.console())
    return EXIT_OK


# -- environments on the hosts ---------------------------------------------------------------
@cli.group()
def env():
    """The package environments sshjobs built on the hosts (see `sshjobs install`)."""


@env.command("list")
@_inventory_options
@_output_options
def env_list(**kw):
    """The environments on every host: requirements, Python, created, last used."""
    from .display import age, print_table, python_id
    opts = _options(kw)
    inv = load_inventory(opts)

    async def work(cluster: Cluster) -> list[Result]:
        return await cluster.list_envs()

    results = run_cluster(inv, opts, work, title="env list", via=_via("list_envs"))
    if opts.as_json:
        emit_results(results, opts)
    else:
        rows, ok = [], []
        now = time.time()
        for r in results:
            if not r.ok:
                rows.append([r.host, "-", "-", "-", "-", "-", f"{r.error.type}: {r.error.message}" if r.error else ""])
                ok.append(False)
                continue
            for e in r.value or [{"hash": "(none)"}]:
                rows.append([r.host, str(e.get("hash", ""))[:12], " ".join(e.get("requirements", [])) or "-",
                             python_id(e.get("python")), age(now, e.get("created")), age(now, e.get("last_used")),
                             "" if e.get("complete", True) else "incomplete"])
                ok.append(True)
        print_table(["host", "env", "requirements", "python", "created", "last used", ""], rows,
                     opts.console(), ok=ok)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


@env.command("prune")
@click.option("--older-than", default="7d", show_default=True, metavar="AGE",
              help="Remove environments not used for AGE (30m, 12h, 7d, 2w) and interrupted builds.")
@_inventory_options
@_output_options
def env_prune(older_than, **kw):
    """Remove environments nobody used lately (one in use right now is kept)."""
    from .display import print_table
    from .provisioning import parse_age

    opts = _options(kw)
    try:
        parse_age(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    inv = load_inventory(opts)

    async def work(cluster: Cluster) -> list[Result]:
        return await cluster.prune_envs(older_than)

    results = run_cluster(inv, opts, work, title="env prune", via=_via("prune_envs", older_than))
    if opts.as_json:
        emit_results(results, opts)
    else:
        rows = [[r.host, str(len(r.value["removed"])), str(len(r.value["kept"])), ""] if r.ok else
                [r.host, "-", "-", f"{r.error.type}: {r.error.message}" if r.error else "failed"] for r in results]
        print_table(["host", "removed", "kept", "error"], rows, opts.console(), ok=[r.ok for r in results])
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


@cli.command()
@click.argument("trace", metavar="TRACE", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", metavar="FILE", type=click.Path(dir_okay=False),
              help="The HTML file to write. Default: TRACE with the suffix .html.")
def timeline(trace, output):
    """Draw a trace (run --trace, map --trace, Cluster(trace=...)) as one HTML file.

    One row per host slot, each job a bar coloured by its outcome (ok, failed, timeout),
    the connects, worker starts and installs beside; hover a bar for its job, host and
    duration. The file is self-contained (no network): open it in any browser.
    """
    from .timeline import write_html

    out = Path(output) if output else Path(trace).with_suffix(".html")
    drawn = write_html(trace, out)
    click.echo(f"timeline: {drawn.jobs} jobs on {drawn.rows} rows of {drawn.hosts} hosts -> {out}")
    return EXIT_OK


# -- sessions: connections and workers kept warm between commands ------------------------------
def _inventory_file(inventory: str | None) -> str:
    return inventory_path(Options(inventory=inventory))


def parse_duration(text: str) -> float:
    """30, 90s, 30m, 2h, 1d: seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration (30m, 2h, 90s)", param_hint="--idle") from None
    if value < 0:
        raise click.BadParameter(f"{text!r} is below 0", param_hint="--idle")
    return value


@cli.command()
@click.option("-i", "--inventory", metavar="FILE", envvar="SSHJOBS_INVENTORY", show_envvar=True,
              help=f"The inventory (TOML). Default: $SSHJOBS_INVENTORY, then ./{DEFAULT_INVENTORY}.")
@click.option("--idle", default="30m", show_default=True, metavar="DURATION",
              help="End after this long without a call (90s, 30m, 2h; 0: never).")
@click.option("--timeout", "start_timeout", type=click.FloatRange(min=1), default=120, show_default=True,
              metavar="SECONDS", help="How long the session may take to connect every host.")
def up(inventory, idle, start_timeout):
    """Keep connections and workers to every host of the inventory warm, for the commands
    and scripts that follow.

    A session process starts in the background and holds them; run, map, exec, ping,
    install, put/get/sync, env and the Python API's Inventory.load(FILE) calls on the same
    inventory file (same content) go through it by themselves, and connect anew when none
    is up (--no-session, or Inventory.load(FILE, session=False), never use one). It
    listens on a socket only this user can reach, and ends with `sshjobs down` or after
    --idle without a call; when the inventory file changed, the next call with the new
    content makes it start over with it. Exit 1 when a host failed to start (the session
    stays up for the others and tries it again later).
    """
    import subprocess

    from . import session
    from .display import fmt_duration
    from .inventory import BaseInventory

    path = _inventory_file(inventory)
    inv = BaseInventory.load(path)  # an inventory error is told here, not in the session's log
    seconds = parse_duration(idle)
    status = session.ask(path)
    if status is not None:
        if status["content"] == inv.file[1]:
            click.echo(f"session for {path} already up (pid {status['pid']}): {_hosts_line(status)}")
            return EXIT_OK
        click.echo(f"session for {path} serves an older content of the file: starting it over", err=True)
        _stop_session(path)
    folder = session.session_dir(create=True)
    log_path = folder / f"{session.key(path)}.log"
    read_end, write_end = os.pipe()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        cmd = [sys.executable, "-m", "sshjobs.sessiond", os.path.realpath(path), "--ready-fd", str(write_end)]
        if seconds > 0:
            cmd += ["--idle", str(seconds)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, pass_fds=(write_end,),
                                start_new_session=True, cwd=os.path.dirname(os.path.realpath(path)))
    finally:
        os.close(fd)
        os.close(write_end)
    line = _read_line(read_end, start_timeout)
    if line is None:
        proc.kill()
        click.echo(f"Error: the session did not start within {start_timeout:g}s (its log: {log_path})", err=True)
        return EXIT_FAILED
    try:
        status = json.loads(line)
    except ValueError:
        status = {"error": f"the session ended as it started (its log: {log_path})"}
    if "error" in status:
        click.echo(f"Error: {status['error']}", err=True)
        return EXIT_FAILED
    limit = f"ends after {fmt_duration(seconds)} idle" if seconds > 0 else "no idle limit"
    click.echo(f"session for {path} up (pid {status['pid']}): {_hosts_line(status)}; {limit};"
               f" `sshjobs down` ends it")
    failed = [h for h in status["hosts"] if h["error"]]
    for h in failed:
        click.echo(f"  {h['name']}: {h['error']}", err=True)
    return EXIT_FAILED if failed else EXIT_OK


def _read_line(fd: int, timeout: float) -> str | None:
    """The first line written to ``fd`` (empty when its writer closed it first); None after ``timeout``."""
    import select

    data = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace").strip()


def _hosts_line(status: dict) -> str:
    hosts = status["hosts"]
    up = sum(h["up"] for h in hosts)
    return f"{up} of {len(hosts)} hosts up, {sum(h['workers'] for h in hosts)} workers"


def _stop_session(path: str, wait: float = 15.0) -> int | None:
    """End the session of an inventory file and wait for its process; its pid, or None."""
    from . import session

    pid = session.stop(path)
    if pid is None:
        return None
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    return pid


@cli.command()
@click.option("-i", "--inventory", metavar="FILE", envvar="SSHJOBS_INVENTORY", show_envvar=True,
              help=f"The inventory (TOML). Default: $SSHJOBS_INVENTORY, then ./{DEFAULT_INVENTORY}.")
@click.option("--all", "every", is_flag=True, help="End every session of this user.")
def down(inventory, every):
    """End the session `sshjobs up` started for the inventory: its workers exit, its
    connections close."""
    from . import session

    paths = [s["inventory"] for s in session.running()] if every else [_inventory_file(inventory)]
    if every and not paths:
        click.echo("no session is up")
    for path in paths:
        pid = _stop_session(path)
        click.echo(f"session for {path} ended (pid {pid})" if pid else f"no session is up for {path}")
    return EXIT_OK


@cli.command()
@click.option("-i", "--inventory", metavar="FILE", envvar="SSHJOBS_INVENTORY", show_envvar=True,
              help="Only the session of this inventory. Default: every session of this user.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per session on stdout.")
def status(inventory, as_json):
    """The sessions that are up: their inventory, hosts, workers, calls and jobs served, idle time.

    Exit 1 when none is up (for -i FILE: none for that file).
    """
    from . import session
    from .display import fmt_duration, print_table

    if inventory:
        one = session.ask(inventory)
        found = [one] if one is not None else []
    else:
        found = session.running()
    if as_json:
        for s in found:
            print(json.dumps(s))
        return EXIT_OK if found else EXIT_FAILED
    if not found:
        click.echo(f"no session is up{' for ' + inventory if inventory else ''}")
        return EXIT_FAILED
    rows = [[s["inventory"], str(s["pid"]), f"{sum(h['up'] for h in s['hosts'])}/{len(s['hosts'])}",
             str(sum(h["workers"] for h in s["hosts"])), str(s["calls"]), str(s["jobs"]),
             "busy" if s["running"] else fmt_duration(s["idle"]),
             fmt_duration(s["idle_limit"]) if s["idle_limit"] else "-"] for s in found]
    print_table(["inventory", "pid", "hosts up", "workers", "calls", "jobs", "idle", "idle limit"], rows,
                Options().console())
    for s in found:
        if s["stale"]:
            click.echo(f"{s['inventory']} changed since the session loaded it: the next call with it starts it over")
        for h in s["hosts"]:
            if h["error"]:
                click.echo(f"  {h['name']}: {h['error']}")
    return EXIT_OK


# -- the lab ------------------------------------------------------------------------------------
@cli.group()
def lab():
    """A local lab of real OpenSSH servers (for trying sshjobs and for its tests)."""


@lab.command("up")
@click.option("--hosts", "-n", type=click.IntRange(1, 250), default=10, show_default=True)
@click.option("--dir", "directory", default=".lab", show_default=True, metavar="DIR",
              help="Where the lab keeps its keys, configs and logs.")
@click.option("--out", default="inventory/lab.toml", show_default=True, metavar="FILE",
              help="Where to write the lab's inventory.")
@click.option("--subnet", type=click.IntRange(0, 255), default=1, show_default=True,
              help="As root: host i listens on 127.0.SUBNET.(OFFSET+i).")
@click.option("--offset", type=click.IntRange(0, 253), default=0, show_default=True)
@click.option("--prefix", default="sshjobs-lab", show_default=True,
              help="As root: host i logs in the Unix user PREFIX<i> (created if missing).")
def lab_up(hosts, directory, out, subnet, offset, prefix):
    """Start HOSTS sshd servers and write their inventory; they run until `sshjobs lab down`."""
    import logging

    from .display import fold
    from .lab import Lab, LabError
    from .log import configure

    configure(logging.WARNING)
    running = Lab.running(directory)
    if running:
        click.echo(f"Error: a lab is already running in {directory} ({fold(running)}): "
                   f"stop it with `sshjobs lab down --dir {directory}`", err=True)
        return EXIT_FAILED
    try:
        the_lab = Lab(hosts, directory, subnet=subnet, prefix=prefix, inventory_path=out, offset=offset).up()
    except LabError as exc:
        click.echo(f"Error: {exc}", err=True)
        return EXIT_FAILED
    first, last = the_lab.hosts[0], the_lab.hosts[-1]
    where = f"{first.address}-{last.address.rsplit('.', 1)[-1]}" if first.port == 22 else f"127.0.0.1 ports {first.port}..."
    click.echo(f"lab: {hosts} OpenSSH servers up on {where}; inventory in {out}")
    click.echo(f"stop it with: sshjobs lab down --dir {directory}")
    return EXIT_OK


@lab.command("down")
@click.option("--dir", "directory", default=".lab", show_default=True, metavar="DIR")
def lab_down(directory):
    """Stop the servers of the lab in DIR (by their recorded pids)."""
    from .display import fold
    from .lab import Lab

    stopped = Lab.stop_recorded(directory)
    click.echo(f"lab: stopped {len(stopped)} servers" + (f" ({fold(stopped)})" if stopped else ""))
    return EXIT_OK


# -- entry point ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    sshimport.own_process()
    try:
        code = cli.main(args=argv, prog_name="sshjobs", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:  # usage errors: exit 2
        exc.show()
        code = exc.exit_code
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        code = EXIT_USAGE
    except (KeyboardInterrupt, click.Abort):
        click.echo("interrupted", err=True)
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else EXIT_OK)
